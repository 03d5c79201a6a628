//! `extract` refuses what would land outside its target, never overwrites, and leaves
//! nothing behind when a stream turns out truncated or corrupt.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use myrocks_hotbackup::format::Format;

use crate::common::*;

/// A minimal ustar header with a correct checksum, for crafting hostile archives.
fn tar_entry(name: &str, data: &[u8], kind: u8) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    set_tar_checksum(&mut h);
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out: Vec<u8> = entries
        .iter()
        .flat_map(|(n, d)| tar_entry(n, d, b'0'))
        .collect();
    out.extend_from_slice(&[0; 1024]);
    out
}

fn xbstream_chunk(path: &str, data: Option<&[u8]>) -> Vec<u8> {
    let mut c = b"XBSTCK01\0".to_vec();
    c.push(if data.is_some() { b'P' } else { b'E' });
    c.extend_from_slice(&(path.len() as u32).to_le_bytes());
    c.extend_from_slice(path.as_bytes());
    if let Some(d) = data {
        c.extend_from_slice(&(d.len() as u64).to_le_bytes());
        c.extend_from_slice(&0u64.to_le_bytes());
        c.extend_from_slice(&crc32fast::hash(d).to_le_bytes());
        c.extend_from_slice(d);
    }
    c
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn tar_with_parent_or_absolute_paths_is_refused() {
    for evil in ["../evil", "a/../../evil", "/tmp/evil-abs"] {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("t");
        let stream = tar_of(&[("fine", b"ok"), (evil, b"pwned")]);
        let out = extract_bytes(&stream, &target);
        assert_eq!(out.status.code(), Some(3), "{evil}: {}", stderr(&out));
        assert!(stderr(&out).contains("unsafe path"), "{}", stderr(&out));
        assert!(!tmp.path().join("evil").exists() && !Path::new("/tmp/evil-abs").exists());
        assert!(!target.exists(), "the partial extraction must be removed");
    }
}

#[test]
fn xbstream_with_parent_or_absolute_paths_is_refused() {
    for evil in ["../evil", "/tmp/evil-abs-xb"] {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("t");
        let mut stream = xbstream_chunk(evil, Some(b"pwned"));
        stream.extend(xbstream_chunk(evil, None));
        let out = extract_bytes(&stream, &target);
        assert_eq!(out.status.code(), Some(3), "{evil}: {}", stderr(&out));
        assert!(!tmp.path().join("evil").exists() && !Path::new("/tmp/evil-abs-xb").exists());
    }
}

#[test]
fn symlinked_directories_in_the_target_are_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let (target, outside) = (tmp.path().join("t"), tmp.path().join("outside"));
    fs::create_dir_all(&target).unwrap();
    fs::create_dir_all(&outside).unwrap();
    symlink(&outside, target.join("db")).unwrap();
    let out = extract_bytes(&tar_of(&[("db/t.frm", b"x")]), &target);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not a directory"), "{}", stderr(&out));
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn symlink_entries_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut stream = tar_entry("link", b"", b'2');
    stream.extend_from_slice(&[0; 1024]);
    let out = extract_bytes(&stream, &tmp.path().join("t"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
}

#[test]
fn existing_files_are_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("t");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("keep"), b"precious").unwrap();
    let out = extract_bytes(&tar_of(&[("new", b"n"), ("keep", b"clobbered")]), &target);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refuses to overwrite"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read(target.join("keep")).unwrap(), b"precious");
    assert!(
        !target.join("new").exists(),
        "files created before the failure are removed"
    );
}

/// Cut a stream of ours anywhere: extract fails, names where, and leaves nothing behind.
#[test]
fn truncated_streams_fail_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    put(
        &src,
        "db/a.frm",
        &pseudo_random(1, 3000),
        0o640,
        1_700_000_000,
    );
    put(
        &src,
        "db/b.frm",
        &pseudo_random(2, 100),
        0o640,
        1_700_000_000,
    );
    for format in [Format::Tar, Format::Xbstream] {
        let stream = stream_of(format, &src);
        // Inside the file data, at a chunk boundary (after a file's end), before the manifest.
        let inside = stream
            .windows(4)
            .position(|w| w == &pseudo_random(1, 3000)[..4])
            .unwrap()
            + 1000;
        // Exactly where the manifest begins: the format alone cannot see this cut.
        let name_at = stream
            .windows(22)
            .position(|w| w == b"myrocks_hotbackup.json")
            .unwrap();
        let manifest_at = match format {
            Format::Tar => name_at,
            Format::Xbstream => name_at - 14,
        };
        for cut in [inside, manifest_at, stream.len() - 1] {
            let target = tmp.path().join(format!("t-{format:?}-{cut}"));
            let out = extract_bytes(&stream[..cut], &target);
            assert_eq!(
                out.status.code(),
                Some(3),
                "{format:?} cut at {cut}: {}",
                stderr(&out)
            );
            assert!(
                stderr(&out).contains("truncated"),
                "{format:?} cut at {cut}: {}",
                stderr(&out)
            );
            assert!(
                !target.exists(),
                "{format:?} cut at {cut}: partial extraction left behind"
            );
        }
        let target = tmp.path().join(format!("whole-{format:?}"));
        let out = extract_bytes(&stream, &target);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_same_tree(&src, &target, format == Format::Tar);
    }
}

#[test]
fn the_error_names_the_file_and_offset_of_a_truncation() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    put(
        &src,
        "db/a.frm",
        &pseudo_random(1, 3000),
        0o640,
        1_700_000_000,
    );
    let stream = stream_of(Format::Tar, &src);
    let at = stream
        .windows(4)
        .position(|w| w == &pseudo_random(1, 3000)[..4])
        .unwrap();
    let out = extract_bytes(&stream[..at + 1234], &tmp.path().join("t"));
    assert!(
        stderr(&out).contains("\"db/a.frm\" at byte 1234 of 3000"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn garbage_and_empty_input_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, bytes) in [("empty", &b""[..]), ("garbage", &[7u8; 2000][..])] {
        let out = extract_bytes(bytes, &tmp.path().join(name));
        assert_eq!(out.status.code(), Some(3), "{name}: {}", stderr(&out));
    }
}

/// Regression: a base-256 mode field (first byte 0x80) made the tar reader panic, which
/// skipped the clean-up of a partial extraction.
#[test]
fn a_base256_mode_field_is_read_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let mut stream = tar_of(&[("first", b"data"), ("second", b"more")]);
    let second = 1024; // header of the second entry
    stream[second + 100..second + 108].copy_from_slice(&[0x80, 0, 0, 0, 0, 0, 1, 0xa4]);
    set_tar_checksum(&mut stream[second..second + 512]);
    let target = tmp.path().join("t");
    let out = extract_bytes(&stream, &target);
    assert!(
        out.status.success(),
        "a base-256 mode is valid: {}",
        stderr(&out)
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(target.join("second"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o644
    );
}

#[test]
fn setuid_bits_are_not_restored() {
    let tmp = tempfile::tempdir().unwrap();
    let mut stream = tar_of(&[("suid", b"#!/bin/sh\n")]);
    stream[100..108].copy_from_slice(b"0004755\0");
    set_tar_checksum(&mut stream[..512]);
    let target = tmp.path().join("t");
    let out = extract_bytes(&stream, &target);
    assert!(out.status.success(), "{}", stderr(&out));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(target.join("suid"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o755
    );
}
