//! `binlog archive`: a replica that writes the server's binary logs into an archive
//! directory, whole transactions at a time, synced before they count. It resumes where
//! the archive ends (after a restart of either side), and reconnects when the server goes
//! away, until a signal stops it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::archive::{self, FileIndex, Writer};
use super::client::{Client, Packet};
use super::event::{self, Header};
use crate::cancel::Cancel;
use crate::error::{Error, IoContext, Result};
use crate::log::human;
use crate::server::credentials::Credentials;
use crate::server::Server;
use crate::{error, info, warn};

pub struct Options {
    /// How to reach the server (not needed to copy files from its directory).
    pub creds: Option<Credentials>,
    pub dir: PathBuf,
    /// The server id the archiver registers with.
    pub server_id: u32,
    /// An idle server sends a heartbeat this often; three missed mean a dead link.
    pub heartbeat: Duration,
    /// Where an empty archive starts [default: the oldest file the server has].
    pub start_file: Option<String>,
    /// The longest a transaction waits for its sync once received.
    pub sync_interval: Duration,
}

/// How often the loop wakes up when the server sends nothing.
const POLL: Duration = Duration::from_millis(50);
/// The archive falling this far behind the server's clock is reported.
const LAG_WARNING: u64 = 60;

/// Runs until a signal stops it (then returns Ok), or a failure that a reconnection
/// cannot cure (a full disk, an archive that the server's files do not continue).
pub fn run(opts: &Options, cancel: &Cancel) -> Result<()> {
    let mut archive = Writer::open(&opts.dir)?;
    let mut connected_once = false;
    let mut backoff = Duration::from_millis(500);
    loop {
        let result = session(opts, &mut archive, cancel, &mut connected_once);
        // Whatever happened, what was received of whole transactions is kept.
        let kept = archive.rewind();
        if cancel.check().is_err() {
            kept?;
            info!("Stopped: the archive ends at GTID {}", state_text(&archive));
            return Ok(());
        }
        kept?;
        match result {
            Ok(()) => backoff = Duration::from_millis(500),
            Err(e @ (Error::Server(_) | Error::Network(_))) if connected_once => {
                warn!("{e}; reconnecting in {:.1} s", backoff.as_secs_f64());
            }
            Err(e) => return Err(e),
        }
        if stopped_within(backoff, cancel, &archive) {
            return Ok(());
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

fn state_text(archive: &Writer) -> String {
    archive
        .archived_state()
        .map(|s| s.position_text())
        .unwrap_or_default()
}

/// Where the dump starts: the file and position the archive ends at.
fn start_point(server: &mut Server, archive: &Writer, opts: &Options) -> Result<(String, u64)> {
    let logs: Vec<(String, u64)> = server
        .rows("SHOW BINARY LOGS", ())
        .map_err(|e| Error::Server(format!("{e} (is the binary log on? the archiver needs --log-bin and BINLOG MONITOR or REPLICATION CLIENT)")))?;
    let has = |name: &str| logs.iter().any(|(n, _)| n == name);
    let Some(last) = archive.files.last() else {
        let first = match &opts.start_file {
            Some(f) if has(f) => f.clone(),
            Some(f) => {
                return Err(Error::Usage(format!(
                    "--start-file {f}: the server has no such binary log (SHOW BINARY LOGS)"
                )))
            }
            None => logs
                .first()
                .map(|l| l.0.clone())
                .ok_or_else(|| Error::Server("the server has no binary logs".into()))?,
        };
        return Ok((first, 4));
    };
    if !last.closed {
        if !has(&last.name) {
            return Err(Error::Refused(format!(
                "the server has no {} any more, which the archive holds up to {}: it was purged or this is \
                 another server; archive this server into a new directory",
                last.name, last.size
            )));
        }
        check_same_history(server, last)?;
        return Ok((last.name.clone(), last.size));
    }
    // The next file after the last closed one.
    let next = logs
        .iter()
        .map(|l| l.0.clone())
        .find(|n| archive::later_name(n, &last.name));
    match next {
        Some(n) => {
            if let Some(oldest) = logs.first() {
                if oldest.0 == n && !follows(&last.name, &n) {
                    error!(
                        "The server no longer has the binary logs between {} and {n}: they were purged \
                         before they were archived; the archive has a gap there",
                        last.name
                    );
                }
            }
            Ok((n, 4))
        }
        // The server has not opened the next file yet (it is shutting down, say).
        None => Err(Error::Server(format!(
            "the server has no binary log after {} yet",
            last.name
        ))),
    }
}

/// Refuses to append to a file that the server's file of that name does not continue.
fn check_same_history(server: &mut Server, last: &FileIndex) -> Result<()> {
    let at: Vec<Option<String>> = server.rows(
        "SELECT BINLOG_GTID_POS(?, ?)",
        (last.name.clone(), last.size),
    )?;
    let theirs = at.into_iter().next().flatten().unwrap_or_default();
    let sorted = |text: &str| {
        let mut v: Vec<String> = text.split(',').map(|s| s.trim().to_string()).collect();
        v.sort();
        v
    };
    if sorted(&theirs) != sorted(&last.end.position_text()) {
        return Err(Error::Refused(format!(
            "the server's {} at {} is at GTID {theirs:?}, the archive's at {:?}: another server, or this one \
             lost the end of that file in a crash (sync_binlog=0); archive it into a new directory",
            last.name,
            last.size,
            last.end.position_text()
        )));
    }
    Ok(())
}

fn follows(prev: &str, next: &str) -> bool {
    match (prev.rsplit_once('.'), next.rsplit_once('.')) {
        (Some((_, a)), Some((_, b))) => {
            a.parse::<u64>().ok().map(|n| n + 1) == b.parse::<u64>().ok()
        }
        _ => false,
    }
}

/// One connection: from connecting to the server to its end.
fn session(
    opts: &Options,
    archive: &mut Writer,
    cancel: &Cancel,
    connected_once: &mut bool,
) -> Result<()> {
    let creds = opts.creds.as_ref().ok_or_else(|| {
        Error::Usage("the archiver needs the server's connection settings".into())
    })?;
    let mut server = Server::connect(creds)?;
    let vars: Vec<(String, u32, String)> = server.rows(
        "SELECT @@global.binlog_checksum, @@server_id, CAST(IFNULL(@@global.encrypt_binlog, 0) AS CHAR)",
        (),
    )?;
    let (checksum, own_id, encrypted) = vars.into_iter().next().unwrap_or_default();
    if encrypted == "1" {
        return Err(Error::Refused(
            "the server encrypts its binary logs (encrypt_binlog=ON): an archive of the decrypted stream \
             would not be the server's files; not supported"
                .into(),
        ));
    }
    if own_id == opts.server_id {
        return Err(Error::Usage(format!(
            "--server-id {} is the server's own id: give the archiver another one",
            opts.server_id
        )));
    }
    let crc = checksum.eq_ignore_ascii_case("CRC32");
    let (file, pos) = start_point(&mut server, archive, opts)?;
    drop(server);

    let mut client = Client::connect(creds, Duration::from_secs(10))?;
    let heartbeat_ns = opts.heartbeat.as_nanos();
    client.exec(&format!(
        "SET @master_binlog_checksum = '{checksum}', @mariadb_slave_capability = 4, \
         @master_heartbeat_period = {heartbeat_ns}"
    ))?;
    client.register(opts.server_id, &crate::sys::hostname())?;
    client.dump(opts.server_id, &file, pos as u32, POLL)?;
    if !*connected_once {
        info!(
            "Archiving the binary logs of {} into {} as replica {}, from {file}:{pos}",
            creds.endpoint,
            opts.dir.display(),
            opts.server_id
        );
    } else {
        info!("Reconnected: archiving from {file}:{pos}");
    }
    *connected_once = true;

    let mut last_sync = Instant::now();
    let mut warned_lag = Instant::now() - Duration::from_secs(3600);
    let mut received: u64 = 0;
    loop {
        cancel.check()?;
        let packet = client.next()?;
        let now = Instant::now();
        match packet {
            None => {
                // Counted from the last bytes: a large event arrives in many reads.
                if client.quiet_for() > opts.heartbeat * 3 {
                    return Err(Error::Server(format!(
                        "nothing from the server at {} for {:.0} s, not even a heartbeat",
                        creds.endpoint,
                        client.quiet_for().as_secs_f64()
                    )));
                }
                archive.commit()?;
                last_sync = now;
                continue;
            }
            Some(Packet::End) => {
                archive.commit()?;
                return Err(Error::Server("the server ended the dump".into()));
            }
            Some(Packet::Event(ev)) => {
                let h = Header::parse(&ev)
                    .ok_or_else(|| Error::Server("a truncated event in the dump".into()))?;
                if h.kind == event::HEARTBEAT {
                    archive.commit()?;
                    last_sync = now;
                    continue;
                }
                if h.flags & event::ARTIFICIAL != 0 || h.next_pos == 0 {
                    if h.kind == event::ROTATE {
                        let name = rotate_target(&ev, crc)?;
                        archive.begin(&name)?;
                        let at = archive.position();
                        if at > 0 && u64::from(rotate_pos(&ev)) != at {
                            return Err(Error::Corrupt(format!(
                                "the server resumes {name} at {}, the archive holds {at} bytes",
                                rotate_pos(&ev)
                            )));
                        }
                    }
                    continue;
                }
                received += ev.len() as u64;
                let ended = archive.append(&ev)?;
                if ended {
                    archive.close()?;
                    last_sync = now;
                    log_archived(archive);
                } else if now - last_sync >= opts.sync_interval {
                    archive.commit()?;
                    last_sync = now;
                }
                let lag = unix_now().saturating_sub(u64::from(h.timestamp));
                if h.timestamp > 0
                    && lag > LAG_WARNING
                    && now - warned_lag > Duration::from_secs(60)
                {
                    warned_lag = now;
                    warn!(
                        "The archive is {lag} s behind the server ({} received this session): the \
                         archive's disk or the network is slower than the server writes",
                        human(received)
                    );
                }
            }
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A rotate event's file name: after the 8-byte position, up to the checksum if any.
fn rotate_target(ev: &[u8], crc: bool) -> Result<String> {
    let end = ev.len().saturating_sub(if crc { 4 } else { 0 });
    let body = ev.get(event::HEADER_LEN + 8..end).unwrap_or_default();
    let name = String::from_utf8_lossy(body).to_string();
    match archive::is_binlog_name(&name) {
        true => Ok(name),
        false => Err(Error::Server(format!(
            "a rotate event to an unexpected name {name:?}"
        ))),
    }
}

fn rotate_pos(ev: &[u8]) -> u32 {
    ev.get(event::HEADER_LEN..event::HEADER_LEN + 8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()) as u32)
}

/// The default server id: derived from this host's name and the archive's path, so that
/// two archivers differ, in a range servers rarely use.
pub fn default_server_id(dir: &Path) -> u32 {
    let path = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut h = crc32fast::Hasher::new();
    h.update(crate::sys::hostname().as_bytes());
    h.update(path.as_os_str().as_encoded_bytes());
    let h = h.finalize();
    0xf000_0000 | (h & 0x0fff_ffff)
}

/// `--from-datadir`: copies the server's closed binary logs (every file its index lists but
/// the last) from its directory into the archive, every `poll`, until a signal stops it.
pub fn run_from_files(
    source: &Path,
    opts: &Options,
    poll: Duration,
    cancel: &Cancel,
) -> Result<()> {
    let index = find_index(source)?;
    let mut archive = Writer::open(&opts.dir)?;
    info!(
        "Archiving the closed binary logs listed in {} into {}, every {:.0} s",
        index.display(),
        opts.dir.display(),
        poll.as_secs_f64()
    );
    loop {
        let text = std::fs::read_to_string(&index).with_path("read", &index)?;
        let listed: Vec<PathBuf> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let p = Path::new(l.trim());
                match p.is_absolute() {
                    true => p.to_path_buf(),
                    false => index.parent().unwrap_or(Path::new(".")).join(p),
                }
            })
            .collect();
        let closed = &listed[..listed.len().saturating_sub(1)];
        for path in closed {
            cancel.check()?;
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if let Some(f) = archive.files.iter().find(|f| f.name == name) {
                let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(f.size);
                if len != f.size {
                    return Err(Error::Refused(format!(
                        "{} is {len} bytes but the archive's {name} holds {}: not the server the archive was                          taken from; archive it into a new directory",
                        path.display(),
                        f.size
                    )));
                }
                continue;
            }
            let older = match (archive.files.last(), &opts.start_file) {
                (Some(last), _) => !archive::later_name(&name, &last.name),
                (None, Some(first)) => archive::later_name(first, &name),
                (None, None) => false,
            };
            if older {
                continue;
            }
            let data = match std::fs::read(path) {
                Ok(d) => d,
                // Purged between the index's reading and now.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
            };
            archive.import(&name, &data)?;
            log_archived(&archive);
        }
        if stopped_within(poll, cancel, &archive) {
            return Ok(());
        }
    }
}

/// Waits `wait`, or until a signal says stop (then logs where the archive ends).
fn stopped_within(wait: Duration, cancel: &Cancel, archive: &Writer) -> bool {
    let until = Instant::now() + wait;
    while Instant::now() < until {
        if cancel.check().is_err() {
            info!("Stopped: the archive ends at GTID {}", state_text(archive));
            return true;
        }
        std::thread::sleep(POLL);
    }
    false
}

/// Logs the file the archive has just ended.
fn log_archived(archive: &Writer) {
    if let Some(f) = archive.files.last() {
        info!(
            "Archived {}: {}, {} transactions, GTID {}",
            f.name,
            human(f.size),
            f.transactions,
            f.end.position_text()
        );
    }
}

/// The server's binary log index: the file given, or the one `*.index` in the directory
/// given whose entries are binary logs.
fn find_index(source: &Path) -> Result<PathBuf> {
    if source.is_file() {
        return Ok(source.to_path_buf());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(source).with_path("read", source)? {
        let path = entry.with_path("read", source)?.path();
        let is_index = path.extension().is_some_and(|e| e == "index")
            && std::fs::read_to_string(&path).is_ok_and(|t| {
                t.lines().next().is_some_and(|l| {
                    let name = Path::new(l.trim()).file_name().unwrap_or_default();
                    archive::is_binlog_name(&name.to_string_lossy())
                })
            });
        if is_index {
            found.push(path);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::Usage(format!(
            "{} has no binary log index (BASENAME.index): give the directory of the server's log_bin_basename,              or the index file itself",
            source.display()
        ))),
        _ => Err(Error::Usage(format!(
            "{} has several binary log indexes: give the one to archive",
            source.display()
        ))),
    }
}
