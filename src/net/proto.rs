//! The messages of a transfer. Control messages are JSON; a block carries a binary header
//! (id, offset, CRC-32, path) before its bytes.
//!
//! A sender opens every connection with [`Hello`]; the receiver answers [`Welcome`] (what
//! it already holds) or [`Refused`]. Then the sender sends blocks, file ends and at last
//! the commit, each with an id the receiver acknowledges once it has written it; the
//! receiver says when a whole file is held ([`FileDone`]) and when the backup is committed.
//! Either side sends a heartbeat when it has been quiet for a second.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::manifest::FileRecord;

pub const HELLO: u8 = 1;
pub const WELCOME: u8 = 2;
pub const REFUSED: u8 = 3;
pub const BLOCK: u8 = 4;
pub const END: u8 = 5;
pub const ACK: u8 = 6;
pub const FILE_DONE: u8 = 7;
pub const COMMIT: u8 = 8;
pub const COMMITTED: u8 = 9;
pub const ABORT: u8 = 10;
pub const PING: u8 = 11;

/// The version of this protocol; both sides must speak the same.
pub const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub session: String,
    pub token: String,
    /// The sending host's name.
    pub host: String,
    /// The server backed up (host, and socket or port): files held of another server are
    /// not reused, as SST names repeat across servers.
    pub source: String,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("session", &self.session)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Blocks of a file the receiver holds without its end: `(offset, length, crc32)`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Partial {
    pub path: String,
    pub blocks: Vec<(u64, u32, u32)>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Welcome {
    /// Files held whole and verified.
    pub held: Vec<FileRecord>,
    pub partial: Vec<Partial>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Refused {
    pub reason: String,
    /// True when the sender may try again soon: another sender holds the receiver.
    pub retry: bool,
    /// How long that other sender has been silent (it may be dead: its connections end
    /// within the dead-connection time).
    #[serde(default)]
    pub other_silent_secs: u64,
}

/// The end of a file: what it is, and every block it is made of, `(offset, length,
/// CRC-32)` (sent now or held already), so the receiver knows when it has them all.
#[derive(Debug, Serialize, Deserialize)]
pub struct End {
    pub record: FileRecord,
    pub blocks: Vec<(u64, u32, u32)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FileDone {
    pub path: String,
    /// Why the file was not accepted, when it was not.
    pub problem: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Committed {
    /// What the receiver did besides (a restore), for the sender to report.
    pub report: Vec<String>,
}

pub fn to_json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("messages serialize")
}

pub fn from_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::Network(format!("a malformed message: {e}")))
}

pub struct BlockHeader<'a> {
    pub id: u64,
    pub offset: u64,
    pub crc32: u32,
    pub path: &'a str,
}

impl BlockHeader<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(22 + self.path.len());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.crc32.to_le_bytes());
        out.extend_from_slice(&(self.path.len() as u16).to_le_bytes());
        out.extend_from_slice(self.path.as_bytes());
        out
    }

    /// The header, and the block's bytes after it.
    pub fn decode(body: &[u8]) -> Result<(BlockHeader<'_>, &[u8])> {
        let bad = || Error::Network("a malformed block".into());
        if body.len() < 22 {
            return Err(bad());
        }
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        let path_len = u16::from_le_bytes([body[20], body[21]]) as usize;
        let path = body.get(22..22 + path_len).ok_or_else(bad)?;
        let header = BlockHeader {
            id: u64_at(0),
            offset: u64_at(8),
            crc32: u32::from_le_bytes(body[16..20].try_into().expect("4 bytes")),
            path: std::str::from_utf8(path).map_err(|_| bad())?,
        };
        Ok((header, &body[22 + path_len..]))
    }
}

/// An id before a body (ends, commits, acknowledgements).
pub fn with_id(id: u64, rest: &[u8]) -> Vec<u8> {
    let mut out = id.to_le_bytes().to_vec();
    out.extend_from_slice(rest);
    out
}

pub fn split_id(body: &[u8]) -> Result<(u64, &[u8])> {
    match body.split_first_chunk::<8>() {
        Some((id, rest)) => Ok((u64::from_le_bytes(*id), rest)),
        None => Err(Error::Network("a message without its id".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_header_round_trips_and_short_ones_are_refused() {
        let header = BlockHeader {
            id: 7,
            offset: 1 << 40,
            crc32: 0xdead_beef,
            path: ".rocksdb/000012.sst",
        };
        let mut body = header.encode();
        body.extend_from_slice(b"data");
        let (back, data) = BlockHeader::decode(&body).unwrap();
        assert_eq!(
            (back.id, back.offset, back.crc32, back.path, data),
            (7, 1 << 40, 0xdead_beef, ".rocksdb/000012.sst", &b"data"[..])
        );
        assert!(BlockHeader::decode(&body[..21]).is_err());
        assert!(BlockHeader::decode(&body[..25]).is_err());
    }
}
