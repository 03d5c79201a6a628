//! Encryption at rest: every object of an encrypted repository is sealed with AES-256-GCM
//! (authenticated: a changed, truncated or reordered byte is detected, not decoded), and
//! every object name derived from data is an HMAC under the repository's key, so names
//! say nothing of what they hold.
//!
//! Why AES-256-GCM (ring): it is the AEAD every audited library and hardware offers (AES-NI
//! and carry-less multiply make it the fastest here), and ring is already the TLS crypto of
//! the network transfer. Its weak spot, a repeated nonce under one key, cannot happen: each
//! object gets its own key, derived with HKDF-SHA256 from the master key and 32 random
//! bytes stored in the object's header, and its segments are numbered.
//!
//! A sealed object is the header (`MHB1`, a mode byte, the salt) then segments of
//! [`SEGMENT`] bytes of plaintext, each followed by its 16-byte tag; the last segment is
//! shorter (possibly empty) and flagged in its nonce, so a cut object never opens. An
//! object of an unencrypted repository is the same header (mode 0) then the plain bytes:
//! the CRCs in the snapshot check those.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf::{Salt, HKDF_SHA256};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::{Error, IoContext, Result};
use crate::net::tls::hex;

/// Plaintext bytes per sealed segment.
pub const SEGMENT: usize = 1 << 20;
const TAG: usize = 16;
const MAGIC: &[u8; 4] = b"MHB1";
const SALT: usize = 32;

/// The repository's master key. `Debug` never shows it.
pub struct Key {
    master: [u8; 32],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("Key(<hidden>)")
    }
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| Error::Refused("the system's random generator failed".into()))?;
    Ok(out)
}

impl Key {
    /// Reads a key file: 64 hex digits. Warns when others may read it.
    pub fn load(path: &Path) -> Result<Key> {
        let text = std::fs::read_to_string(path).with_path("read the key file", path)?;
        if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
            crate::warn!(
                "the key file {} can be read by other users: chmod 600 it",
                path.display()
            );
        }
        let digits = text.trim();
        let bytes: Option<Vec<u8>> = (digits.len() == 64)
            .then(|| {
                (0..32)
                    .map(|i| u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).ok())
                    .collect()
            })
            .flatten();
        match bytes {
            Some(b) => Ok(Key {
                master: b.try_into().expect("32 bytes"),
            }),
            None => Err(Error::Usage(format!(
                "{} is not a key file (it must hold 64 hex digits)",
                path.display()
            ))),
        }
    }

    /// Writes a new random key into a new file readable by its owner only.
    pub fn create(path: &Path) -> Result<Key> {
        let key = Key { master: random()? };
        let mut file = std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_path("create the key file", path)?;
        writeln!(file, "{}", hex(&key.master))
            .and_then(|_| file.sync_all())
            .with_path("write", path)?;
        Ok(key)
    }

    fn derive(&self, salt: &[u8], label: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        Salt::new(HKDF_SHA256, salt)
            .extract(&self.master)
            .expand(&[label], HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut out))
            .expect("32 bytes is a valid HKDF-SHA256 output");
        out
    }

    fn mac(&self, label: &[u8], data: &[u8]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.derive(b"", label));
        hex(hmac::sign(&key, data).as_ref())
    }

    /// What the repository's config records to recognise this key.
    pub fn check_value(&self, repo_id: &str) -> String {
        self.mac(b"mhb key check", repo_id.as_bytes())
    }

    /// An object name for `identity` that reveals nothing without the key.
    pub fn name(&self, identity: &str) -> String {
        self.mac(b"mhb object name", identity.as_bytes())
    }

    fn segment_key(&self, salt: &[u8]) -> LessSafeKey {
        let bytes = self.derive(salt, b"mhb object key");
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes).expect("a 32-byte key"))
    }
}

fn nonce(counter: u64, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&counter.to_be_bytes());
    n[11] = last as u8;
    Nonce::assume_unique_for_key(n)
}

/// Seals an object as it is written: bytes in, sealed bytes out.
pub struct Sealer {
    key: Option<LessSafeKey>,
    pending: Vec<u8>,
    counter: u64,
}

impl Sealer {
    /// Starts an object; `out` receives its header.
    pub fn new(key: Option<&Key>, out: &mut Vec<u8>) -> Result<Sealer> {
        out.extend_from_slice(MAGIC);
        let key = match key {
            Some(k) => {
                let salt: [u8; SALT] = random()?;
                out.push(1);
                out.extend_from_slice(&salt);
                Some(k.segment_key(&salt))
            }
            None => {
                out.push(0);
                None
            }
        };
        Ok(Sealer {
            key,
            pending: Vec::new(),
            counter: 0,
        })
    }

    /// Bytes of the object a sealed header plus `len` plaintext bytes take.
    pub fn sealed_len(encrypted: bool, len: u64) -> u64 {
        match encrypted {
            true => 5 + SALT as u64 + len + (len / SEGMENT as u64 + 1) * TAG as u64,
            false => 5 + len,
        }
    }

    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        let Some(key) = &self.key else {
            out.extend_from_slice(data);
            return;
        };
        while !data.is_empty() {
            let take = (SEGMENT - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == SEGMENT {
                let mut segment = std::mem::take(&mut self.pending);
                key.seal_in_place_append_tag(
                    nonce(self.counter, false),
                    Aad::empty(),
                    &mut segment,
                )
                .expect("AES-GCM seals any segment");
                self.counter += 1;
                out.extend_from_slice(&segment);
            }
        }
    }

    pub fn finish(mut self, out: &mut Vec<u8>) {
        if let Some(key) = &self.key {
            let mut segment = std::mem::take(&mut self.pending);
            key.seal_in_place_append_tag(nonce(self.counter, true), Aad::empty(), &mut segment)
                .expect("AES-GCM seals any segment");
            out.extend_from_slice(&segment);
        }
    }
}

/// Seals a whole object held in memory.
pub fn seal(key: Option<&Key>, plain: &[u8]) -> Result<Vec<u8>> {
    let mut out =
        Vec::with_capacity(Sealer::sealed_len(key.is_some(), plain.len() as u64) as usize);
    let mut sealer = Sealer::new(key, &mut out)?;
    sealer.push(plain, &mut out);
    sealer.finish(&mut out);
    Ok(out)
}

/// Opens an object read piece by piece (a large SST is downloaded in ranges).
pub struct Opener {
    key: Option<LessSafeKey>,
    pending: Vec<u8>,
    counter: u64,
}

impl Opener {
    /// Reads the header at the start of `sealed`; returns the opener and the header's length.
    pub fn new(key: Option<&Key>, sealed: &[u8], what: &str) -> Result<(Opener, usize)> {
        let damaged = |why: &str| Error::Corrupt(format!("{what} is damaged: {why}"));
        if sealed.len() < 5 || &sealed[..4] != MAGIC {
            return Err(damaged("it does not start like an object of this tool"));
        }
        let (key, header) = match (sealed[4], key) {
            (0, None) => (None, 5),
            (1, Some(k)) if sealed.len() >= 5 + SALT => {
                (Some(k.segment_key(&sealed[5..5 + SALT])), 5 + SALT)
            }
            (1, Some(_)) => return Err(damaged("its header is cut short")),
            (1, None) => {
                return Err(Error::Usage(format!(
                    "{what} is encrypted: give the repository's --key-file"
                )))
            }
            (0, Some(_)) => return Err(damaged("it is not encrypted, but the repository is")),
            (m, _) => return Err(damaged(&format!("unknown mode {m}"))),
        };
        let opener = Opener {
            key,
            pending: Vec::new(),
            counter: 0,
        };
        Ok((opener, header))
    }

    /// Opens what arrived; whole segments are decoded into `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>, what: &str) -> Result<()> {
        if self.key.is_none() {
            out.extend_from_slice(data);
            return Ok(());
        }
        // A full segment is only known not to be the last once a byte after it arrives.
        while !data.is_empty() {
            let take = (SEGMENT + TAG + 1 - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == SEGMENT + TAG + 1 {
                let rest = self.pending.split_off(SEGMENT + TAG);
                let segment = std::mem::replace(&mut self.pending, rest);
                self.open_segment(segment, false, out, what)?;
            }
        }
        Ok(())
    }

    pub fn finish(mut self, out: &mut Vec<u8>, what: &str) -> Result<()> {
        if self.key.is_some() {
            let segment = std::mem::take(&mut self.pending);
            self.open_segment(segment, true, out, what)?;
        }
        Ok(())
    }

    fn open_segment(
        &mut self,
        mut segment: Vec<u8>,
        last: bool,
        out: &mut Vec<u8>,
        what: &str,
    ) -> Result<()> {
        let key = self
            .key
            .as_ref()
            .expect("only encrypted objects have segments");
        let plain = key
            .open_in_place(nonce(self.counter, last), Aad::empty(), &mut segment)
            .map_err(|_| {
                Error::Corrupt(format!(
                    "{what} is damaged or was not written with this key (segment {} does not authenticate)",
                    self.counter
                ))
            })?;
        out.extend_from_slice(plain);
        self.counter += 1;
        Ok(())
    }
}

/// Opens a whole object held in memory.
pub fn open(key: Option<&Key>, sealed: &[u8], what: &str) -> Result<Vec<u8>> {
    let (mut opener, header) = Opener::new(key, sealed, what)?;
    let mut out = Vec::with_capacity(sealed.len());
    opener.push(&sealed[header..], &mut out, what)?;
    opener.finish(&mut out, what)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key { master: [7; 32] }
    }

    #[test]
    fn sealed_objects_open_whole_and_in_pieces_and_nothing_else_does() {
        let k = key();
        for len in [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT + 5] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let sealed = seal(Some(&k), &plain).unwrap();
            assert_eq!(sealed.len() as u64, Sealer::sealed_len(true, len as u64));
            assert_eq!(open(Some(&k), &sealed, "t").unwrap(), plain);
            // In odd-sized pieces.
            let (mut o, h) = Opener::new(Some(&k), &sealed, "t").unwrap();
            let mut out = Vec::new();
            for piece in sealed[h..].chunks(777_777) {
                o.push(piece, &mut out, "t").unwrap();
            }
            o.finish(&mut out, "t").unwrap();
            assert_eq!(out, plain);
            // Cut short, by a segment or a byte; one bit flipped; another key.
            if len >= SEGMENT {
                let cut = &sealed[..sealed.len() - (len % SEGMENT) - TAG];
                assert!(open(Some(&k), cut, "t").is_err());
            }
            assert!(open(Some(&k), &sealed[..sealed.len() - 1], "t").is_err());
            let mut flipped = sealed.clone();
            flipped[sealed.len() / 2] ^= 4;
            assert!(open(Some(&k), &flipped, "t").is_err());
            assert!(open(Some(&Key { master: [8; 32] }), &sealed, "t").is_err());
        }
        let plain = seal(None, b"abc").unwrap();
        assert_eq!(open(None, &plain, "t").unwrap(), b"abc");
        assert!(open(Some(&k), &plain, "t").is_err());
        assert!(open(None, &seal(Some(&k), b"abc").unwrap(), "t").is_err());
    }

    #[test]
    fn names_depend_on_the_key_and_key_files_round_trip() {
        assert_ne!(key().name("a"), Key { master: [8; 32] }.name("a"));
        assert_ne!(key().name("a"), key().name("b"));
        assert_eq!(key().name("a").len(), 64);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let made = Key::create(&path).unwrap();
        assert_eq!(Key::load(&path).unwrap().master, made.master);
        assert!(
            Key::create(&path).is_err(),
            "an existing key file is never overwritten"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&path, "not a key").unwrap();
        assert!(Key::load(&path).is_err());
    }
}
