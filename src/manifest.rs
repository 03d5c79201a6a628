//! The backup's own records. Every stream this tool writes opens with a small marker file
//! and closes with a manifest listing every file with its size and CRC-32. Neither tar nor
//! xbstream can tell a stream cut at a file boundary from a whole one, and xbstream's CRCs
//! do not cover file names; the marker tells `extract` that a manifest must follow, and the
//! manifest lets it prove that every file arrived whole, under its own name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::destination::Destination;
use crate::error::{Error, Result};
use crate::source::{FileReader, FileRecord};

/// First file of every stream we write.
pub const BEGIN_NAME: &str = "myrocks_hotbackup.begin";
/// Last file of every stream we write.
pub const MANIFEST_NAME: &str = "myrocks_hotbackup.json";

pub fn tool_version() -> String {
    concat!("myrocks-hotbackup ", env!("CARGO_PKG_VERSION")).to_string()
}

/// Contents of the marker file.
#[derive(Debug, Serialize, Deserialize)]
pub struct Begin {
    pub tool: String,
    /// Seconds since the epoch.
    pub started: i64,
}

/// Contents of the manifest. `backup` describes where the data came from (absent for
/// streams that are not database backups).
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest<B> {
    pub tool: String,
    pub backup: B,
    /// Every file of the stream except the manifest itself, in stream order.
    pub files: Vec<FileRecord>,
}

/// Writes the marker that opens a stream.
pub fn write_begin(reader: &mut FileReader, dest: &mut dyn Destination) -> Result<FileRecord> {
    let begin = Begin {
        tool: tool_version(),
        started: crate::log::unix_now(),
    };
    let json = serde_json::to_vec_pretty(&begin).expect("serialisable");
    reader.send_bytes(BEGIN_NAME, &json, dest)
}

/// Writes the manifest that closes a stream, then finishes the destination.
pub fn write_manifest<B: Serialize>(
    manifest: &Manifest<B>,
    reader: &mut FileReader,
    dest: &mut dyn Destination,
) -> Result<()> {
    let mut json = serde_json::to_vec_pretty(manifest).expect("serialisable");
    json.push(b'\n');
    reader.send_bytes(MANIFEST_NAME, &json, dest)?;
    dest.finish()
}

/// Checks what arrived (path → size and CRC-32) against the manifest that came with it.
/// A stream that opened with the marker must close with a manifest.
pub fn verify_received(
    received: &BTreeMap<String, (u64, u32)>,
    manifest_json: Option<&[u8]>,
) -> Result<()> {
    let Some(json) = manifest_json else {
        if received.contains_key(BEGIN_NAME) {
            return Err(Error::Corrupt(format!(
                "the stream was written by myrocks-hotbackup but ends without its manifest \
                 ({MANIFEST_NAME}): it is truncated"
            )));
        }
        return Ok(());
    };
    let manifest: Manifest<serde_json::Value> = serde_json::from_slice(json)
        .map_err(|e| Error::Corrupt(format!("{MANIFEST_NAME} is not a valid manifest: {e}")))?;
    let mut listed = BTreeMap::new();
    for f in &manifest.files {
        listed.insert(f.path.as_str(), f);
        match received.get(&f.path) {
            None => {
                return Err(Error::Corrupt(format!(
                    "{:?} is listed in the manifest but missing from the stream",
                    f.path
                )))
            }
            Some(&(size, crc32)) if (size, crc32) != (f.size, f.crc32) => {
                return Err(Error::Corrupt(format!(
                    "{:?} does not match the manifest: {size} bytes with CRC-32 {crc32:#010x}, \
                     expected {} bytes with CRC-32 {:#010x}",
                    f.path, f.size, f.crc32
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = received
        .keys()
        .find(|p| *p != MANIFEST_NAME && !listed.contains_key(p.as_str()))
    {
        return Err(Error::Corrupt(format!(
            "{extra:?} is in the stream but not in its manifest"
        )));
    }
    Ok(())
}
