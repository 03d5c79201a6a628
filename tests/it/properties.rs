//! Property tests: random trees survive our writer and `extract` unchanged, and any single
//! damaged byte of one of our streams is detected: never a silent success.

use std::fs;
use std::path::{Path, PathBuf};

use myrocks_hotbackup::format::Format;
use proptest::prelude::*;

use crate::common::*;

/// A random tree: up to 12 files, 1 to 3 levels deep, names with `#`, sizes up to 40 KB.
fn tree() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let name = "[a-z#_0-9]{1,8}";
    let path = prop::collection::vec(name, 1..=3).prop_map(|parts| parts.join("/"));
    let file = (path, 0usize..40_000, any::<u64>())
        .prop_map(|(p, len, seed)| (p, pseudo_random(seed, len)));
    prop::collection::vec(file, 1..12)
}

/// Materialises a tree, skipping files whose path collides with a directory of another.
/// Every directory gets a file of its own, as `mbstream -x` needs to create it.
fn build(root: &Path, files: &[(String, Vec<u8>)]) {
    for (path, data) in files {
        let full = root.join(path);
        let clashes = full.ancestors().skip(1).any(|a| a.is_file()) || full.is_dir();
        if !clashes {
            put(root, path, data, 0o640, 1_700_000_000);
        }
    }
    for dir in walk(root)
        .iter()
        .filter_map(|p| p.rsplit_once('/').map(|(d, _)| d.to_string()))
    {
        for ancestor in Path::new(&dir)
            .ancestors()
            .filter(|a| !a.as_os_str().is_empty())
        {
            let keep = root.join(ancestor).join("0keep");
            if !keep.exists() {
                put(
                    root,
                    keep.strip_prefix(root).unwrap().to_str().unwrap(),
                    b"k",
                    0o640,
                    1_700_000_000,
                );
            }
        }
    }
}

/// Builds `files` in a new temporary directory and writes them as one of our streams.
fn stream_of(files: &[(String, Vec<u8>)], format: Format) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    build(&src, files);
    let stream = crate::common::stream_of(format, &src);
    (tmp, src, stream)
}

fn format() -> impl Strategy<Value = Format> {
    prop_oneof![Just(Format::Tar), Just(Format::Xbstream)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_round_trip(files in tree(), format in format()) {
        let (tmp, src, stream) = stream_of(&files, format);
        let out = tmp.path().join("out");
        let res = extract_bytes(&stream, &out);
        prop_assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
        assert_same_tree(&src, &out, format == Format::Tar);
    }

    #[test]
    fn any_damaged_byte_is_detected(
        files in tree(), format in format(), at in any::<prop::sample::Index>(), flip in 1u8..=255,
    ) {
        let (tmp, _, mut stream) = stream_of(&files, format);
        let pos = at.index(stream.len());
        stream[pos] ^= flip;
        let out = tmp.path().join("out");
        let res = extract_bytes(&stream, &out);
        prop_assert!(!res.status.success(), "damage at byte {pos} of {} went unnoticed", stream.len());
        prop_assert!(!out.exists(), "a damaged stream left files behind");
    }

    /// Any damaged byte inside any tar header is detected by the header checksum alone,
    /// whoever wrote the archive (no manifest needed).
    #[test]
    fn any_damaged_tar_header_byte_is_detected(files in tree(), which in any::<prop::sample::Index>(),
                                               offset in 0usize..512, flip in 1u8..=255) {
        let (tmp, _, mut stream) = stream_of(&files, Format::Tar);
        let headers = tar_header_offsets(&stream);
        let pos = headers[which.index(headers.len())] + offset;
        stream[pos] ^= flip;
        let res = extract_bytes(&stream, &tmp.path().join("out"));
        prop_assert!(!res.status.success());
        let err = String::from_utf8_lossy(&res.stderr);
        prop_assert!(err.contains("tar header") || err.contains("not plausible") || err.contains("truncated")
                     || err.contains("neither a tar archive"),
                     "damage at header byte {pos}: {err}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Hostile headers with valid checksums: extract may refuse them, but never panics and
    /// never leaves files behind on failure.
    #[test]
    fn hostile_tar_headers_never_panic(
        fields in prop::collection::vec(any::<u8>(), 512),
        kind in prop_oneof![Just(b'0'), Just(b'5'), Just(b'L'), Just(b'x'), any::<u8>()],
    ) {
        let mut h = fields;
        h[156] = kind;
        set_tar_checksum(&mut h);
        h.extend_from_slice(&[0; 4096]);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let res = extract_bytes(&h, &out);
        prop_assert!(res.status.code().is_some_and(|c| c != 101), "panic: {}", String::from_utf8_lossy(&res.stderr));
        if !res.status.success() {
            prop_assert!(!out.exists(), "a refused stream left files behind");
        }
    }
}

/// Offsets of every header block in a tar stream of ours (octal sizes, no PAX).
fn tar_header_offsets(stream: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = 0;
    while stream[at..at + 512].iter().any(|&b| b != 0) {
        offsets.push(at);
        let size_field = std::str::from_utf8(&stream[at + 124..at + 135]).unwrap();
        let size = usize::from_str_radix(size_field, 8).unwrap();
        at += 512 + size.div_ceil(512) * 512;
    }
    offsets
}
