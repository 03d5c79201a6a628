//! RocksDB's unique identity of an SST file, read from the file itself. A block-based table
//! ends with a footer pointing to its metaindex block, whose `rocksdb.properties` entry points
//! to the table properties; three of them say which database (`db_id`), which session of it
//! and under which file number the table was created, and stay the same when the file is
//! copied, hard-linked or renamed. This module owns that walk, and nothing more of the
//! format: no data blocks, no comparator, no decompression, no checksums (the blocks are
//! bounds-checked, not verified). Legacy footers, format_version 1 to 5 (MariaDB 10.11
//! writes 2) and the footer of format_version 6 and later are understood.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, IoContext, Result};

/// RocksDB's identity of a table file: who created it, in which session, under which number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SstId {
    pub db_id: String,
    pub db_session_id: String,
    pub file_number: u64,
}

/// `kBlockBasedTableMagicNumber`, and the legacy one of format_version 0.
const MAGIC: u64 = 0x88e2_41b7_85f4_cff7;
const LEGACY_MAGIC: u64 = 0xdb47_7524_8b80_fb57;
/// Footers: [checksum type] 40 bytes of handles (or of fields since 6), [version u32] magic.
const FOOTER_LEN: u64 = 1 + 40 + 4 + 8;
const LEGACY_FOOTER_LEN: u64 = 40 + 8;
/// What format_version 6 puts where the handles were, before the footer's other fields.
const EXTENDED_MAGIC: [u8; 4] = [0x3e, 0x00, 0x7a, 0x00];
/// After each block: its compression type (0 for none) and a 32-bit checksum.
const TRAILER_LEN: u64 = 5;
const MAX_BLOCK: u64 = 64 << 20;

/// Where a block lies: offset and size, the trailer excluded.
type Handle = (u64, u64);

/// Reads the identity from the file's properties block; Ok(None) when the file is a valid
/// table without these properties (an older RocksDB), or with a compressed meta block; Err
/// for unreadable or corrupt files. `size` is the file's length: the footer ends there.
pub fn unique_id(file: &File, size: u64) -> Result<Option<SstId>> {
    let (metaindex, footer_at) = footer(file, size)?;
    let Some(meta) = read_block(file, metaindex, footer_at)? else {
        return Ok(None);
    };
    let mut props = None;
    scan(&meta, |key, value| {
        if key == b"rocksdb.properties" {
            props = Some(value);
        }
    })?;
    let Some(mut props) = props else {
        return Ok(None);
    };
    let Some(props) = read_block(file, handle(&mut props)?, footer_at)? else {
        return Ok(None);
    };
    let (mut db_id, mut session_id, mut number) = (None, None, None);
    scan(&props, |key, value| match key {
        b"rocksdb.creating.db.identity" => db_id = Some(value),
        b"rocksdb.creating.session.identity" => session_id = Some(value),
        b"rocksdb.original.file.number" => number = Some(value),
        _ => {}
    })?;
    let (Some(db_id), Some(session_id), Some(mut number)) = (db_id, session_id, number) else {
        return Ok(None);
    };
    let id = SstId {
        db_id: text(db_id)?,
        db_session_id: text(session_id)?,
        file_number: varint(&mut number)?,
    };
    // Like RocksDB, which gives a table missing any of the three no unique id.
    let complete = !id.db_id.is_empty() && !id.db_session_id.is_empty() && id.file_number != 0;
    Ok(complete.then_some(id))
}

/// The metaindex block's handle, and the footer's offset (where every block must end).
fn footer(file: &File, size: u64) -> Result<(Handle, u64)> {
    if size < LEGACY_FOOTER_LEN {
        return Err(corrupt(format!("{size} bytes are too few for a table")));
    }
    let mut buf = [0u8; FOOTER_LEN as usize];
    let len = size.min(FOOTER_LEN);
    let buf = &mut buf[(FOOTER_LEN - len) as usize..];
    read_at(file, buf, size - len)?;
    let magic = u64::from_le_bytes(buf[buf.len() - 8..].try_into().unwrap());
    if magic == LEGACY_MAGIC {
        let mut part2 = &buf[buf.len() - LEGACY_FOOTER_LEN as usize..];
        return Ok((handle(&mut part2)?, size - LEGACY_FOOTER_LEN));
    }
    if magic != MAGIC {
        return Err(corrupt(format!(
            "not a block-based table (magic {magic:#018x})"
        )));
    }
    if len < FOOTER_LEN {
        return Err(corrupt(format!("{size} bytes are too few for a table")));
    }
    let footer_at = size - FOOTER_LEN;
    match u32::from_le_bytes(buf[41..45].try_into().unwrap()) {
        1..=5 => Ok((handle(&mut &buf[1..41])?, footer_at)),
        // The metaindex block lies just before the footer; the footer gives its size only.
        6.. if buf[1..5] == EXTENDED_MAGIC => {
            let size = u64::from(u32::from_le_bytes(buf[13..17].try_into().unwrap()));
            let offset = footer_at.checked_sub(TRAILER_LEN + size);
            let offset = offset.ok_or_else(|| corrupt("metaindex larger than the file"))?;
            Ok(((offset, size), footer_at))
        }
        version => Err(corrupt(format!(
            "corrupt or unsupported table format_version {version}"
        ))),
    }
}

/// The block's contents, or None when it is compressed.
fn read_block(file: &File, (offset, size): Handle, footer_at: u64) -> Result<Option<Vec<u8>>> {
    let end = offset.checked_add(size + TRAILER_LEN);
    if size > MAX_BLOCK || end.is_none_or(|end| end > footer_at) {
        return Err(corrupt(format!(
            "block of {size} bytes at {offset} does not fit in {footer_at} bytes"
        )));
    }
    let mut buf = vec![0; (size + TRAILER_LEN) as usize];
    read_at(file, &mut buf, offset)?;
    if buf[size as usize] != 0 {
        return Ok(None);
    }
    buf.truncate(size as usize);
    Ok(Some(buf))
}

/// Calls `f` with each key and value of a block, in order. Entries are prefix-compressed
/// (shared, non-shared and value lengths, the key's new part, the value), followed by the
/// restart offsets (u32 each) and their count.
fn scan<'a>(block: &'a [u8], mut f: impl FnMut(&[u8], &'a [u8])) -> Result<()> {
    let count_at = block
        .len()
        .checked_sub(4)
        .ok_or_else(|| corrupt("block too short"))?;
    let restarts = u32::from_le_bytes(block[count_at..].try_into().unwrap()) as usize;
    let entries_end = restarts
        .checked_mul(4)
        .and_then(|len| count_at.checked_sub(len))
        .ok_or_else(|| corrupt("block restart array larger than the block"))?;
    let mut rest = &block[..entries_end];
    let mut key = Vec::new();
    while !rest.is_empty() {
        let shared = length(&mut rest)?;
        let non_shared = length(&mut rest)?;
        let value_len = length(&mut rest)?;
        if shared > key.len() || non_shared > rest.len() || value_len > rest.len() - non_shared {
            return Err(corrupt("block entry overruns the block"));
        }
        key.truncate(shared);
        key.extend_from_slice(&rest[..non_shared]);
        let (value, next) = rest[non_shared..].split_at(value_len);
        f(&key, value);
        rest = next;
    }
    Ok(())
}

fn handle(buf: &mut &[u8]) -> Result<Handle> {
    Ok((varint(buf)?, varint(buf)?))
}

/// A varint32 length within a block (bounded by the caller).
fn length(buf: &mut &[u8]) -> Result<usize> {
    let v = varint(buf)?;
    u32::try_from(v)
        .map(|v| v as usize)
        .map_err(|_| corrupt("block entry length over 32 bits"))
}

/// LEB128, at most 10 bytes.
fn varint(buf: &mut &[u8]) -> Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf
            .split_first()
            .ok_or_else(|| corrupt("truncated varint"))?;
        *buf = rest;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return Err(corrupt("varint over 64 bits"));
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(corrupt("varint over 64 bits"))
}

fn text(bytes: &[u8]) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| corrupt("table identity is not text"))
}

fn read_at(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset)
        .context(|| format!("cannot read {} bytes at {offset} of a table", buf.len()))
}

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!("SST file: {what}"))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const DB_ID: &str = "2b99e4a6-6269-4e2b-ac5d-1474c2780229";
    const SESSION: &str = "UL5H8IZ1QVJJ0MZ6TKPU";

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// A block of sorted entries, a restart every second entry (so some keys share a prefix).
    fn block(entries: &[(&[u8], Vec<u8>)]) -> Vec<u8> {
        let (mut out, mut restarts, mut prev) = (vec![], vec![], &b""[..]);
        for (i, (key, value)) in entries.iter().enumerate() {
            let shared = if i % 2 == 0 {
                restarts.push(out.len() as u32);
                0
            } else {
                key.iter().zip(prev).take_while(|(a, b)| a == b).count()
            };
            for len in [shared, key.len() - shared, value.len()] {
                put_varint(&mut out, len as u64);
            }
            out.extend_from_slice(&key[shared..]);
            out.extend_from_slice(value);
            prev = key;
        }
        for r in &restarts {
            out.extend_from_slice(&r.to_le_bytes());
        }
        out.extend_from_slice(&(restarts.len() as u32).to_le_bytes());
        out
    }

    /// Appends a block and its trailer, returning its handle.
    fn append(file: &mut Vec<u8>, block: &[u8], compression: u8) -> Handle {
        let handle = (file.len() as u64, block.len() as u64);
        file.extend_from_slice(block);
        file.extend_from_slice(&[compression, 0, 0, 0, 0]);
        handle
    }

    fn footer_bytes(file: &mut Vec<u8>, version: u32, metaindex: Handle) {
        let mut handles = vec![];
        if version < 6 {
            for v in [metaindex.0, metaindex.1, 0, 0] {
                put_varint(&mut handles, v);
            }
        } else {
            handles.extend_from_slice(&EXTENDED_MAGIC);
            handles.extend_from_slice(&[0; 8]);
            handles.extend_from_slice(&(metaindex.1 as u32).to_le_bytes());
        }
        handles.resize(40, 0);
        if version > 0 {
            file.push(1);
        }
        file.extend_from_slice(&handles);
        if version > 0 {
            file.extend_from_slice(&version.to_le_bytes());
            file.extend_from_slice(&MAGIC.to_le_bytes());
        } else {
            file.extend_from_slice(&LEGACY_MAGIC.to_le_bytes());
        }
    }

    /// A table: a data block, the properties (when given), the metaindex, the footer.
    fn table(version: u32, props: Option<&[(&[u8], Vec<u8>)]>, compression: u8) -> Vec<u8> {
        let mut file = vec![];
        append(&mut file, &block(&[(b"k", b"v".to_vec())]), 0);
        let mut meta = vec![(&b"rocksdb.filter.x"[..], vec![0, 1])];
        let mut handle_bytes = vec![];
        if let Some(props) = props {
            let (offset, size) = append(&mut file, &block(props), compression);
            put_varint(&mut handle_bytes, offset);
            put_varint(&mut handle_bytes, size);
            meta.push((b"rocksdb.properties", handle_bytes));
        }
        let metaindex = append(&mut file, &block(&meta), 0);
        footer_bytes(&mut file, version, metaindex);
        file
    }

    fn ids(number: u64) -> Vec<(&'static [u8], Vec<u8>)> {
        let mut n = vec![];
        put_varint(&mut n, number);
        vec![
            (b"rocksdb.creating.db.identity", DB_ID.into()),
            (b"rocksdb.creating.host.identity", b"vm".to_vec()),
            (b"rocksdb.creating.session.identity", SESSION.into()),
            (b"rocksdb.data.size", vec![7]),
            (b"rocksdb.original.file.number", n),
        ]
    }

    fn parse(bytes: &[u8]) -> Result<Option<SstId>> {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        unique_id(&file, bytes.len() as u64)
    }

    #[test]
    fn finds_the_ids_in_every_footer_format() {
        for version in [0, 1, 2, 5, 6] {
            let id = parse(&table(version, Some(&ids(300)), 0)).unwrap();
            let want = SstId {
                db_id: DB_ID.into(),
                db_session_id: SESSION.into(),
                file_number: 300,
            };
            assert_eq!(id, Some(want), "format_version {version}");
        }
    }

    #[test]
    fn without_the_ids_there_is_none() {
        assert_eq!(parse(&table(2, None, 0)).unwrap(), None);
        let old: Vec<_> = ids(300)
            .into_iter()
            .filter(|(key, _)| !key.ends_with(b"file.number"))
            .collect();
        assert_eq!(parse(&table(2, Some(&old), 0)).unwrap(), None);
        assert_eq!(parse(&table(2, Some(&ids(0)), 0)).unwrap(), None);
        // A compressed (here: snappy) properties block is not guessed at.
        assert_eq!(parse(&table(2, Some(&ids(300)), 1)).unwrap(), None);
    }

    #[test]
    fn truncated_or_garbage_files_are_errors() {
        let good = table(2, Some(&ids(300)), 0);
        for len in [0, 10, 47, 52, good.len() / 2, good.len() - 1] {
            assert!(parse(&good[..len]).is_err(), "truncated to {len}");
        }
        let garbage: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        assert!(matches!(parse(&garbage), Err(Error::Corrupt(_))));
        // The magic intact, the handles garbage.
        let mut bad = good.clone();
        let footer = bad.len() - FOOTER_LEN as usize;
        bad[footer + 1..footer + 41].fill(0xff);
        assert!(matches!(parse(&bad), Err(Error::Corrupt(_))));
        // A file shorter than the size it is said to have.
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&good).unwrap();
        assert!(matches!(
            unique_id(&file, good.len() as u64 + 100),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn too_large_handles_are_errors() {
        for (offset, size) in [
            (0, MAX_BLOCK + 1),
            (0, 1 << 40),
            (u64::MAX - 2, 10),
            (0, 4000),
        ] {
            let mut file = vec![0; 4000];
            footer_bytes(&mut file, 2, (offset, size));
            let err = parse(&file).unwrap_err();
            assert!(matches!(err, Error::Corrupt(_)), "{offset}+{size}: {err}");
        }
        let mut file = vec![0; 100];
        footer_bytes(&mut file, 6, (0, 101));
        assert!(matches!(parse(&file), Err(Error::Corrupt(_))));
    }

    /// The default column family's first flush of a MariaDB 10.11 server (format_version 2).
    #[test]
    fn reads_a_real_table() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/small.sst");
        let file = File::open(path).unwrap();
        let size = file.metadata().unwrap().len();
        let want = SstId {
            db_id: DB_ID.into(),
            db_session_id: SESSION.into(),
            file_number: 13,
        };
        assert_eq!(unique_id(&file, size).unwrap(), Some(want));
    }
}
