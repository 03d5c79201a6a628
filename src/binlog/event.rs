//! The parts of MariaDB's binary log format the archive needs: event headers, checksums,
//! GTID and GTID list events, and where a transaction (an event group) ends. Everything
//! else is carried as bytes.

use std::collections::BTreeMap;
use std::fmt;

/// Every binary log file starts with these four bytes.
pub const MAGIC: &[u8; 4] = b"\xfebin";
pub const HEADER_LEN: usize = 19;

pub const QUERY: u8 = 2;
pub const STOP: u8 = 3;
pub const ROTATE: u8 = 4;
pub const FORMAT_DESCRIPTION: u8 = 15;
pub const XID: u8 = 16;
pub const HEARTBEAT: u8 = 27;
pub const XA_PREPARE: u8 = 38;
pub const GTID: u8 = 162;
pub const GTID_LIST: u8 = 163;
pub const START_ENCRYPTION: u8 = 164;

/// The flag of an event the server made up for the stream (not in any file).
pub const ARTIFICIAL: u16 = 0x20;
/// The format description's flag of a file still open for writing.
const IN_USE: u16 = 0x1;
const FL_STANDALONE: u8 = 1;

/// The fixed header of an event.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub timestamp: u32,
    pub kind: u8,
    pub server_id: u32,
    pub len: u32,
    /// Where the next event starts in the file (0 for events that are in no file).
    pub next_pos: u32,
    pub flags: u16,
}

impl Header {
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        Some(Header {
            timestamp: u32_at(0),
            kind: b[4],
            server_id: u32_at(5),
            len: u32_at(9),
            next_pos: u32_at(13),
            flags: u16::from_le_bytes([b[17], b[18]]),
        })
    }
}

/// Whether events carry a CRC-32 (read from the file's format description).
pub fn fde_has_checksum(event: &[u8]) -> bool {
    // The format description ends with the checksum algorithm and a checksum.
    event.len() >= HEADER_LEN + 5 && event[event.len() - 5] == 1
}

/// Checks an event's CRC-32. A format description's in-use flag is left out of it: the
/// server clears the flag when it closes the file, without computing the checksum again.
pub fn checksum_ok(event: &[u8]) -> bool {
    if event.len() < HEADER_LEN + 4 {
        return false;
    }
    let (body, sum) = event.split_at(event.len() - 4);
    let mut h = crc32fast::Hasher::new();
    if body[4] == FORMAT_DESCRIPTION {
        let mut head = body[..HEADER_LEN].to_vec();
        let flags = u16::from_le_bytes([head[17], head[18]]) & !IN_USE;
        head[17..19].copy_from_slice(&flags.to_le_bytes());
        h.update(&head);
        h.update(&body[HEADER_LEN..]);
    } else {
        h.update(body);
    }
    h.finalize() == u32::from_le_bytes(sum.try_into().unwrap())
}

/// One transaction's identifier; `D-S-N` in JSON as on the server.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(into = "String", try_from = "String")]
pub struct Gtid {
    pub domain: u32,
    pub server: u32,
    pub seq: u64,
}

impl fmt::Display for Gtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.domain, self.server, self.seq)
    }
}

impl From<Gtid> for String {
    fn from(g: Gtid) -> String {
        g.to_string()
    }
}

impl TryFrom<String> for Gtid {
    type Error = String;
    fn try_from(s: String) -> Result<Gtid, String> {
        s.parse()
    }
}

impl std::str::FromStr for Gtid {
    type Err = String;
    fn from_str(s: &str) -> Result<Gtid, String> {
        let bad = || format!("{s:?} is not a GTID (DOMAIN-SERVER-SEQUENCE, as 0-1-100)");
        let parts: Vec<&str> = s.trim().split('-').collect();
        match parts[..] {
            [d, sv, n] => Ok(Gtid {
                domain: d.parse().map_err(|_| bad())?,
                server: sv.parse().map_err(|_| bad())?,
                seq: n.parse().map_err(|_| bad())?,
            }),
            _ => Err(bad()),
        }
    }
}

/// A binary log state: the last sequence number of each domain and server, as a GTID list
/// event holds it at the start of every file.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct State(pub BTreeMap<String, u64>);

impl State {
    fn key(domain: u32, server: u32) -> String {
        format!("{domain}-{server}")
    }

    pub fn add(&mut self, g: Gtid) {
        self.0.insert(State::key(g.domain, g.server), g.seq);
    }

    pub fn from_list(list: &[Gtid]) -> State {
        let mut s = State::default();
        for g in list {
            s.add(*g);
        }
        s
    }

    pub fn gtids(&self) -> Vec<Gtid> {
        self.0
            .iter()
            .filter_map(|(k, seq)| format!("{k}-{seq}").parse().ok())
            .collect()
    }

    /// The last GTID of each domain (the highest sequence number), as `@@gtid_binlog_pos`.
    pub fn position(&self) -> BTreeMap<u32, Gtid> {
        let mut pos: BTreeMap<u32, Gtid> = BTreeMap::new();
        for g in self.gtids() {
            let e = pos.entry(g.domain).or_insert(g);
            if g.seq > e.seq {
                *e = g;
            }
        }
        pos
    }

    /// `@@gtid_binlog_pos`'s form: `0-1-100,1-2-7`.
    pub fn position_text(&self) -> String {
        let p: Vec<String> = self.position().values().map(|g| g.to_string()).collect();
        p.join(",")
    }

    /// Whether `g` is already in this state (its domain's position is at or past it).
    pub fn contains(&self, g: &Gtid) -> bool {
        self.position()
            .get(&g.domain)
            .is_some_and(|p| p.seq >= g.seq)
    }
}

/// Parses a GTID list event's body (after the header).
pub fn gtid_list(event: &[u8], checksum: bool) -> Option<Vec<Gtid>> {
    let body = payload(event, checksum);
    let count = (u32::from_le_bytes(body.get(..4)?.try_into().ok()?) & 0x0fff_ffff) as usize;
    (0..count)
        .map(|i| {
            let e = body.get(4 + i * 16..4 + (i + 1) * 16)?;
            Some(Gtid {
                domain: u32::from_le_bytes(e[0..4].try_into().ok()?),
                server: u32::from_le_bytes(e[4..8].try_into().ok()?),
                seq: u64::from_le_bytes(e[8..16].try_into().ok()?),
            })
        })
        .collect()
}

/// The event's bytes after the header, without the checksum.
fn payload(event: &[u8], checksum: bool) -> &[u8] {
    let end = event.len() - if checksum { 4 } else { 0 };
    &event[HEADER_LEN.min(end)..end]
}

/// The text of a query event.
fn query_text(event: &[u8], checksum: bool) -> Option<&[u8]> {
    let body = payload(event, checksum);
    let db_len = *body.get(8)? as usize;
    let vars_len = u16::from_le_bytes(body.get(11..13)?.try_into().ok()?) as usize;
    body.get(13 + vars_len + db_len + 1..)
}

/// What an event means for the transaction it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Inside a transaction.
    Inside,
    /// A transaction ends with this event (`gtid` committed).
    Commit(Gtid),
    /// An event between transactions (format description, GTID list, rotate...).
    Outside,
}

/// Follows the events of a file in order: which transaction is open, the state after
/// each commit, and the file's checksum setting.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    pub checksum: bool,
    pub state: State,
    open: Option<(Gtid, bool)>,
}

impl Tracker {
    /// A tracker at a transaction boundary of a file whose state is `state`.
    pub fn at(checksum: bool, state: State) -> Tracker {
        Tracker {
            checksum,
            state,
            open: None,
        }
    }

    /// Takes the next event (whole, as in the file) and says where it stands.
    pub fn step(&mut self, event: &[u8]) -> Result<Step, String> {
        let h = Header::parse(event).ok_or("an event shorter than its header")?;
        match h.kind {
            FORMAT_DESCRIPTION => {
                self.checksum = fde_has_checksum(event);
                self.open = None;
                return Ok(Step::Outside);
            }
            GTID_LIST if self.open.is_none() => {
                let list = gtid_list(event, self.checksum).ok_or("a damaged GTID list event")?;
                self.state = State::from_list(&list);
                return Ok(Step::Outside);
            }
            GTID => {
                if let Some((g, _)) = self.open {
                    return Err(format!("transaction {g} has no end before the next GTID"));
                }
                let b = payload(event, self.checksum);
                if b.len() < 13 {
                    return Err("a damaged GTID event".into());
                }
                let g = Gtid {
                    seq: u64::from_le_bytes(b[0..8].try_into().unwrap()),
                    domain: u32::from_le_bytes(b[8..12].try_into().unwrap()),
                    server: h.server_id,
                };
                let standalone = b[12] & FL_STANDALONE != 0;
                self.open = Some((g, standalone));
                return Ok(Step::Inside);
            }
            _ => {}
        }
        let Some((g, standalone)) = self.open else {
            return Ok(Step::Outside);
        };
        let ends = standalone
            || matches!(h.kind, XID | XA_PREPARE)
            || (h.kind == QUERY
                && query_text(event, self.checksum).is_some_and(|q| {
                    // As the server tells them: `COMMIT` and `ROLLBACK` whole (a
                    // `ROLLBACK TO savepoint` is inside the transaction), `XA COMMIT ...`.
                    let q = q.trim_ascii();
                    let starts =
                        |w: &[u8]| q.len() >= w.len() && q[..w.len()].eq_ignore_ascii_case(w);
                    q.eq_ignore_ascii_case(b"COMMIT")
                        || q.eq_ignore_ascii_case(b"ROLLBACK")
                        || starts(b"XA COMMIT ")
                        || starts(b"XA ROLLBACK ")
                }));
        if ends {
            self.open = None;
            self.state.add(g);
            Ok(Step::Commit(g))
        } else {
            Ok(Step::Inside)
        }
    }

    /// Whether a transaction is open (its end not seen yet).
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u8, server: u32, body: &[u8]) -> Vec<u8> {
        let len = (HEADER_LEN + body.len() + 4) as u32;
        let mut e = Vec::new();
        e.extend(7u32.to_le_bytes());
        e.push(kind);
        e.extend(server.to_le_bytes());
        e.extend(len.to_le_bytes());
        e.extend(0u32.to_le_bytes());
        e.extend(0u16.to_le_bytes());
        e.extend(body);
        let crc = crc32fast::hash(&e);
        e.extend(crc.to_le_bytes());
        e
    }

    fn gtid(seq: u64, domain: u32, flags: u8) -> Vec<u8> {
        let mut b = seq.to_le_bytes().to_vec();
        b.extend(domain.to_le_bytes());
        b.push(flags);
        b.extend([0; 6]);
        event(GTID, 1, &b)
    }

    fn query(text: &str) -> Vec<u8> {
        let mut b = vec![0; 13];
        b.push(0); // empty database name
        b.extend(text.as_bytes());
        event(QUERY, 1, &b)
    }

    #[test]
    fn transactions_end_at_xid_commit_or_after_one_standalone_event() {
        let mut t = Tracker {
            checksum: true,
            ..Tracker::default()
        };
        assert_eq!(t.step(&gtid(5, 0, 0)).unwrap(), Step::Inside);
        assert_eq!(t.step(&query("INSERT")).unwrap(), Step::Inside);
        let g = Gtid {
            domain: 0,
            server: 1,
            seq: 5,
        };
        assert_eq!(t.step(&event(XID, 1, &[0; 8])).unwrap(), Step::Commit(g));
        t.step(&gtid(6, 2, FL_STANDALONE)).unwrap();
        assert!(matches!(
            t.step(&query("CREATE TABLE t (a int)")).unwrap(),
            Step::Commit(_)
        ));
        t.step(&gtid(7, 0, 0)).unwrap();
        assert_eq!(t.step(&query("ROLLBACK TO `sp1`")).unwrap(), Step::Inside);
        assert!(matches!(
            t.step(&query(" commit")).unwrap(),
            Step::Commit(_)
        ));
        assert_eq!(t.state.position_text(), "0-1-7,2-1-6");
        assert!(t.step(&gtid(8, 0, 0)).is_ok());
        assert!(
            t.step(&gtid(9, 0, 0)).is_err(),
            "a transaction without an end"
        );
    }

    #[test]
    fn checksums_are_checked_and_a_flipped_bit_is_caught() {
        let mut e = query("COMMIT");
        assert!(checksum_ok(&e));
        e[HEADER_LEN + 14] ^= 1;
        assert!(!checksum_ok(&e));
    }

    #[test]
    fn states_read_and_print_as_the_server_does() {
        let s = State::from_list(&[
            "0-1-10".parse().unwrap(),
            "0-2-12".parse().unwrap(),
            "1-1-3".parse().unwrap(),
        ]);
        assert_eq!(s.position_text(), "0-2-12,1-1-3");
        assert!(s.contains(&"0-1-11".parse().unwrap()));
        assert!(!s.contains(&"1-1-4".parse().unwrap()));
        assert!("0-1".parse::<Gtid>().is_err());
    }
}
