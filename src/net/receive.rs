//! The receiving end: a listener whose one-line URL a sender needs, and a session that
//! writes the blocks arriving on every connection into the target directory.
//!
//! Each block is written where it belongs (`pwrite`) and acknowledged; a file is complete
//! when its end has arrived and its blocks cover it exactly. It is then synced, checked
//! against the CRC-32 the sender computed while reading it, and recorded in a journal
//! (`.myrocks_hotbackup.receiving`, one JSON line per file) before the sender hears that
//! it is held. The manifest comes last: the receiver checks every file it lists against
//! what it holds, removes leftovers of earlier attempts, and writes it atomically.
//!
//! A receiver restarted on the same directory keeps the files of its journal (their bytes
//! are read and checked again) and removes the rest; a sender that reconnects, or a new
//! sender, hears what is held, and partly held, so nothing held is sent again.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use serde::{Deserialize, Serialize};

use super::link::{Frame, Link, CONNECT_TIMEOUT, DEAD_AFTER, HEARTBEAT};
use super::proto::{self, BlockHeader, Committed, End, FileDone, Hello, Partial, Refused, Welcome};
use super::tls::{self, Identity};
use super::Url;
use crate::cancel::Cancel;
use crate::error::{Error, IoContext, Result};
use crate::format::layout::MANIFEST_NAME;
use crate::format::manifest::{FileRecord, Manifest};
use crate::format::{safe_components, CHUNK_SIZE};
use crate::restore::backup_dir::file_crc;
use crate::sink::dir::{publish_manifest, sync_dir};
use crate::{info, warn};

/// The journal of a receiving directory: files held whole and verified.
pub const JOURNAL_NAME: &str = ".myrocks_hotbackup.receiving";
/// Connections served at once (a sender's streams, and room for refusals), and of those,
/// connections not yet admitted (a stranger cannot crowd out the sender).
const MAX_CONNECTIONS: usize = 80;
const MAX_UNADMITTED: usize = 16;
/// How often the receiver logs what arrived.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

pub struct Options {
    pub target: PathBuf,
    /// Address to listen on (`HOST`, `HOST:PORT`, `:PORT`); all addresses, any free port
    /// when absent.
    pub listen: Option<String>,
    pub streams: usize,
    /// How long to wait for a sender (at first, and after one went away).
    pub wait: Duration,
}

/// A complete backup received.
pub struct Received {
    pub manifest: Manifest<serde_json::Value>,
    /// Where the sender connected from, and its host name.
    pub sender: IpAddr,
    pub sender_host: String,
    pub resent_blocks: u64,
}

/// Work done once the backup is committed (a restore), whose report the sender shows.
pub type AfterCommit = Box<dyn Fn(&Received) -> Result<Vec<String>> + Send + Sync>;

pub struct Receiver {
    /// Held while the receiver runs: one receiver per directory.
    _dir_lock: File,
    listener: TcpListener,
    url: Url,
    config: Arc<ServerConfig>,
    session: Arc<Session>,
    wait: Duration,
}

#[derive(Serialize, Deserialize)]
enum JournalLine {
    #[serde(rename = "done")]
    Done(FileRecord),
    #[serde(rename = "removed")]
    Removed(String),
    /// The server the files come from.
    #[serde(rename = "source")]
    Source(String),
}

impl Receiver {
    /// Takes the target directory (new, empty, or an interrupted transfer's), makes a key
    /// and listens.
    pub fn bind(options: &Options) -> Result<Receiver> {
        let dir_lock = lock_target(&options.target)?;
        let held = prepare_target(&options.target)?;
        let (addr, host) = listen_address(options.listen.as_deref())?;
        let listener = TcpListener::bind(addr).context(|| format!("cannot listen on {addr}"))?;
        let port = listener
            .local_addr()
            .context(|| "cannot read the port".into())?
            .port();
        let identity = Identity::generate()?;
        let url = Url {
            host,
            port,
            session: tls::random_hex(8)?,
            fingerprint: identity.fingerprint.clone(),
            token: tls::random_hex(24)?,
            streams: options.streams,
        };
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(options.target.join(JOURNAL_NAME))
            .with_path("open", &options.target.join(JOURNAL_NAME))?;
        let session = Session {
            root: options.target.clone(),
            session: url.session.clone(),
            token: url.token.clone(),
            state: Mutex::new(State {
                done: held
                    .whole
                    .into_iter()
                    .map(|r| (r.path.clone(), (r, 0)))
                    .collect(),
                parts: held
                    .partial
                    .into_iter()
                    .map(|p| part_on_disk(&options.target, p))
                    .collect::<Result<_>>()?,
                source_id: held.source,
                ..State::default()
            }),
            changed: Condvar::new(),
            journal: Mutex::new(journal),
            connections: AtomicUsize::new(0),
            unadmitted: AtomicUsize::new(0),
            written: AtomicU64::new(0),
            after_commit: Mutex::new(None),
        };
        Ok(Receiver {
            _dir_lock: dir_lock,
            listener,
            url,
            config: tls::server_config(&identity)?,
            session: Arc::new(session),
            wait: options.wait,
        })
    }

    /// The URL a sender needs (it holds the session's secret).
    pub fn url(&self) -> &Url {
        &self.url
    }

    pub fn after_commit(&self, work: AfterCommit) {
        *lock(&self.session.after_commit) = Some(work);
    }

    /// Serves senders until a backup is committed, a sender gives up, no sender comes for
    /// the wait time, or `cancel` fires.
    pub fn run(self, cancel: &Cancel) -> Result<Received> {
        self.listener
            .set_nonblocking(true)
            .context(|| "cannot set up the listener".into())?;
        let mut last_seen = Instant::now();
        let (mut shown_at, mut shown) = (Instant::now(), 0u64);
        loop {
            if shown_at.elapsed() >= PROGRESS_EVERY {
                let written = self.session.written.load(Ordering::Relaxed);
                if written > shown {
                    info!(
                        "Received {} ({}/s), {} files complete",
                        crate::log::human(written),
                        crate::log::human(
                            ((written - shown) as f64 / shown_at.elapsed().as_secs_f64()) as u64
                        ),
                        lock(&self.session.state).done.len()
                    );
                }
                (shown_at, shown) = (Instant::now(), written);
            }
            if let Some(outcome) = self.session.outcome_sent() {
                return outcome;
            }
            if let Err(e) = cancel.check() {
                self.session.stop();
                return Err(e);
            }
            if self.session.has_sender() {
                last_seen = Instant::now();
            } else if last_seen.elapsed() > self.wait {
                self.session.stop();
                return Err(Error::Network(format!(
                    "no sender for {} s: the transfer is abandoned; {} keeps what arrived, and a receiver started on it again resumes",
                    self.wait.as_secs(),
                    self.session.root.display()
                )));
            }
            match self.listener.accept() {
                Ok((sock, peer)) => self.serve(sock, peer),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => warn!("cannot accept a connection: {e}"),
            }
        }
    }

    fn serve(&self, sock: TcpStream, peer: SocketAddr) {
        if self.session.connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS
            || self.session.unadmitted.load(Ordering::Relaxed) >= MAX_UNADMITTED
        {
            warn!("refused a connection from {peer}: too many connections");
            return;
        }
        let _ = sock.set_nonblocking(false);
        self.session.connections.fetch_add(1, Ordering::Relaxed);
        self.session.unadmitted.fetch_add(1, Ordering::Relaxed);
        let session = self.session.clone();
        let config = self.config.clone();
        std::thread::spawn(move || {
            match Link::accept(sock, config) {
                Ok(link) => session.connection(link),
                Err(e) => {
                    session.unadmitted.fetch_sub(1, Ordering::Relaxed);
                    warn!("refused a connection from {peer}: no valid TLS handshake ({e})")
                }
            }
            session.connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// `[HOST][:PORT]` to bind, and the host to print in the URL.
fn listen_address(listen: Option<&str>) -> Result<(SocketAddr, String)> {
    let spec = listen.unwrap_or("");
    let (host, port) = match spec.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, p),
        _ => (spec, "0"),
    };
    let port: u16 = port
        .parse()
        .map_err(|_| Error::Usage(format!("--listen {spec:?}: the port is not a number")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = match host {
        "" => IpAddr::from([0, 0, 0, 0]),
        h => h
            .parse()
            .map_err(|_| Error::Usage(format!("--listen {spec:?}: give an IP address")))?,
    };
    let shown = match ip.is_unspecified() {
        true => crate::sys::hostname(),
        false => ip.to_string(),
    };
    Ok((SocketAddr::new(ip, port), shown))
}

/// Creates the target if absent, and locks it: one receiver per directory.
fn lock_target(root: &Path) -> Result<File> {
    match fs::create_dir(root) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("cannot create {}", root.display()), e)),
    }
    let dir = File::open(root).with_path("open", root)?;
    match crate::sys::try_lock_exclusive(&dir).with_path("lock", root)? {
        true => Ok(dir),
        false => Err(Error::Refused(format!(
            "another receiver is using {}: stop it first",
            root.display()
        ))),
    }
}

/// Checks the target: absent (created), empty, or an interrupted transfer's (its journal's
/// files are checked again; anything else of it is removed). Returns the files held.
fn prepare_target(root: &Path) -> Result<Held> {
    match fs::symlink_metadata(root) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            fs::create_dir(root).with_path("create the target directory", root)?;
            return Ok(Held::default());
        }
        Err(e) => return Err(Error::io(format!("cannot stat {}", root.display()), e)),
        Ok(md) if !md.is_dir() => {
            return Err(Error::Refused(format!(
                "target {} exists and is not a directory",
                root.display()
            )))
        }
        Ok(_) => {}
    }
    if root.join(MANIFEST_NAME).exists() {
        return Err(Error::Refused(format!(
            "target {} already holds a complete backup: receive into a new or empty directory",
            root.display()
        )));
    }
    let journal = root.join(JOURNAL_NAME);
    if !journal.exists() {
        let mut entries = fs::read_dir(root).with_path("list", root)?;
        if let Some(e) = entries.find(|e| !e.as_ref().is_ok_and(|e| e.file_name() == "lost+found"))
        {
            let name = e.map(|e| e.file_name()).unwrap_or_default();
            return Err(Error::Refused(format!(
                "target {} is not empty (it holds {name:?}) and is not an interrupted transfer: receive into a new or empty directory",
                root.display()
            )));
        }
        return Ok(Held::default());
    }
    let mut held: BTreeMap<String, FileRecord> = BTreeMap::new();
    let mut source = None;
    let lines = BufReader::new(File::open(&journal).with_path("open", &journal)?);
    for line in lines.lines() {
        let line = line.with_path("read", &journal)?;
        // A line cut by a crash is the last one, and names nothing held.
        match serde_json::from_str::<JournalLine>(&line) {
            Ok(JournalLine::Done(record)) => {
                held.insert(record.path.clone(), record);
            }
            Ok(JournalLine::Removed(path)) => {
                held.remove(&path);
            }
            Ok(JournalLine::Source(id)) => source = Some(id),
            Err(_) => {}
        }
    }
    info!(
        "Resuming into {}: checking the {} files received before",
        root.display(),
        held.len()
    );
    let mut kept = Vec::new();
    for record in held.into_values() {
        let path = root.join(&record.path);
        match crc_of(&path) {
            Ok((size, crc32)) if size == record.size && crc32 == record.crc32 => kept.push(record),
            _ => warn!(
                "{} is not as it was received: it will be sent again",
                record.path
            ),
        }
    }
    let keep: std::collections::HashSet<PathBuf> =
        kept.iter().map(|r| root.join(&r.path)).collect();
    let mut others = Vec::new();
    files_except(root, "", &keep, &journal, &mut others)?;
    // A file not in the journal was cut short: its blocks are offered to the sender, which
    // sends again only those whose bytes differ (a block never written reads as zeros).
    let mut partial = Vec::new();
    for path in others {
        let full = root.join(&path);
        let blocks = block_crcs(&full).with_path("read", &full)?;
        partial.push(Partial { path, blocks });
    }
    // The journal is written again, with only what is held.
    let mut fresh = Vec::new();
    if let Some(id) = &source {
        fresh.extend(proto::to_json(&JournalLine::Source(id.clone())));
        fresh.push(b'\n');
    }
    for record in &kept {
        fresh.extend(proto::to_json(&JournalLine::Done(record.clone())));
        fresh.push(b'\n');
    }
    let tmp = root.join(format!("{JOURNAL_NAME}.new"));
    fs::write(&tmp, &fresh)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| fs::rename(&tmp, &journal))
        .with_path("write", &journal)?;
    sync_dir(root)?;
    info!(
        "Resuming into {}: {} files already held ({}), {} in part",
        root.display(),
        kept.len(),
        crate::log::human(kept.iter().map(|r| r.size).sum()),
        partial.len()
    );
    Ok(Held {
        whole: kept,
        partial,
        source,
    })
}

/// What a receiving directory already holds: files whole and verified, and blocks of
/// files cut short, as `(offset, length, CRC-32)`.
#[derive(Default)]
struct Held {
    whole: Vec<FileRecord>,
    partial: Vec<Partial>,
    /// The server they came from.
    source: Option<String>,
}

/// The CRC-32 of each block of a file, at the sender's block boundaries.
fn block_crcs(path: &Path) -> std::io::Result<Vec<(u64, u32, u32)>> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut blocks = Vec::new();
    let mut offset = 0u64;
    loop {
        let n = crate::format::read_full(&mut file, &mut buf)?;
        if n == 0 {
            return Ok(blocks);
        }
        blocks.push((offset, n as u32, crc32fast::hash(&buf[..n])));
        offset += n as u64;
    }
}

/// The size and CRC-32 of a file as it is on disk.
fn crc_of(path: &Path) -> Result<(u64, u32)> {
    let size = fs::metadata(path).with_path("stat", path)?.len();
    let crc32 = file_crc(path, &mut vec![0u8; CHUNK_SIZE], &Cancel::never())?;
    Ok((size, crc32))
}

/// The regular files under `root/rel` but `keep` and `journal`, as paths relative to
/// `root` (every file there is the receiver's own: the directory was empty when it began).
fn files_except(
    root: &Path,
    rel: &str,
    keep: &std::collections::HashSet<PathBuf>,
    journal: &Path,
    out: &mut Vec<String>,
) -> Result<()> {
    let dir = root.join(rel);
    for entry in fs::read_dir(&dir).with_path("list", &dir)? {
        let entry = entry.with_path("list", &dir)?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let name = match rel {
            "" => name,
            _ => format!("{rel}/{name}"),
        };
        let kind = entry.file_type().with_path("stat", &path)?;
        if kind.is_dir() {
            files_except(root, &name, keep, journal, out)?;
        } else if kind.is_file() && path != journal && !keep.contains(&path) {
            out.push(name);
        }
    }
    Ok(())
}

/// A file cut short by an earlier receiver, taken up again.
fn part_on_disk(root: &Path, partial: Partial) -> Result<(String, Part)> {
    let Partial { path, blocks } = partial;
    let full = root.join(&path);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&full)
        .with_path("open", &full)?;
    let part = Part {
        file: Arc::new(file),
        blocks: blocks.into_iter().map(|(o, l, c)| (o, (l, c))).collect(),
        end: None,
        finishing: false,
    };
    Ok((path, part))
}

/// A file being received.
struct Part {
    file: Arc<File>,
    /// Blocks written: offset to (length, CRC-32).
    blocks: BTreeMap<u64, (u32, u32)>,
    /// The file's end: its record and every block it is made of.
    end: Option<End>,
    finishing: bool,
}

/// A frame from a sender whose place another sender took.
fn superseded(state: &State, generation: u64) -> Result<()> {
    match state.sender.as_ref().is_some_and(|s| s.1 == generation) {
        true => Ok(()),
        false => Err(Error::Network("another sender took over".into())),
    }
}

#[derive(Default)]
struct State {
    /// The sender the session is bound to: its key's fingerprint and generation.
    sender: Option<(String, u64)>,
    generation: u64,
    /// Live connections of the current sender, and when it was last heard.
    live: usize,
    last_heard: Option<Instant>,
    source: Option<(IpAddr, String)>,
    /// The server the files held came from (a sender's `source`).
    source_id: Option<String>,
    parts: HashMap<String, Part>,
    done: HashMap<String, (FileRecord, u64)>,
    dirs: std::collections::HashSet<PathBuf>,
    committing: bool,
    outcome: Option<std::result::Result<Arc<Committed>, String>>,
    ended: Option<Instant>,
    outcome_sent: bool,
    stopped: bool,
    resent_blocks: u64,
    received: Option<Received>,
}

struct Session {
    root: PathBuf,
    session: String,
    token: String,
    state: Mutex<State>,
    changed: Condvar,
    journal: Mutex<File>,
    connections: AtomicUsize,
    unadmitted: AtomicUsize,
    /// Block bytes written so far.
    written: AtomicU64,
    after_commit: Mutex<Option<AfterCommit>>,
}

/// What the receiver holds, whole and in part, for a sender that connects (nothing when
/// the sender backs up another server than the files held came from).
fn welcome(state: &State, same_source: bool) -> Welcome {
    if !same_source {
        return Welcome::default();
    }
    Welcome {
        held: state.done.values().map(|(r, _)| r.clone()).collect(),
        partial: state
            .parts
            .iter()
            .map(|(path, part)| Partial {
                path: path.clone(),
                blocks: part.blocks.iter().map(|(&o, &(l, c))| (o, l, c)).collect(),
            })
            .collect(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn refuse_none<T>(link: Link, reason: &str, busy: Option<u64>) -> Option<T> {
    refuse(link, reason, busy);
    None
}

/// Refuses a connection; `busy` is how long the sender holding the receiver has been
/// silent, when that is the reason.
fn refuse(mut link: Link, reason: &str, busy: Option<u64>) {
    warn!("refused a connection from {}: {reason}", link.peer);
    let msg = proto::to_json(&Refused {
        reason: reason.to_string(),
        retry: busy.is_some(),
        other_silent_secs: busy.unwrap_or(0),
    });
    let _ = link.send(proto::REFUSED, &[&msg]);
    link.close();
}

impl Session {
    fn has_sender(&self) -> bool {
        let state = lock(&self.state);
        state.live > 0 || state.committing
    }

    fn stop(&self) {
        lock(&self.state).stopped = true;
        self.changed.notify_all();
    }

    /// The end of the session, once its last word reached the sender (or could not).
    fn outcome_sent(&self) -> Option<Result<Received>> {
        let mut state = lock(&self.state);
        let said = state.outcome_sent || state.ended.is_some_and(|t| t.elapsed() > DEAD_AFTER);
        match &state.outcome {
            Some(Err(reason)) if said => Some(Err(Error::Network(reason.clone()))),
            Some(Ok(_)) if said => state.received.take().map(Ok),
            _ => None,
        }
    }

    /// One connection, from its hello to its end.
    fn connection(&self, link: Link) {
        let admitted = self.admission(link);
        self.unadmitted.fetch_sub(1, Ordering::Relaxed);
        let Some((mut link, generation)) = admitted else {
            return;
        };
        if let Err(e) = self.serve(&mut link, generation) {
            let state = lock(&self.state);
            if !state.stopped && state.outcome.is_none() {
                warn!("lost a connection from {}: {e}", link.peer);
            }
        }
        let mut state = lock(&self.state);
        if state.sender.as_ref().is_some_and(|s| s.1 == generation) {
            state.live -= 1;
        }
        drop(state);
        self.changed.notify_all();
    }

    /// The hello, its checks, and the welcome: the connection and its generation, once
    /// admitted.
    fn admission(&self, mut link: Link) -> Option<(Link, u64)> {
        let hello = match link.recv(CONNECT_TIMEOUT) {
            Ok(Some(Frame {
                kind: proto::HELLO,
                body,
            })) => proto::from_json::<Hello>(&body),
            Ok(_) => Err(Error::Network("no hello".into())),
            Err(e) => Err(Error::Network(e.to_string())),
        };
        let hello = match hello {
            Ok(h) => h,
            Err(e) => return refuse_none(link, &format!("not a sender ({e})"), None),
        };
        if hello.version != proto::VERSION {
            return refuse_none(
                link,
                &format!(
                    "protocol version {} (this receiver speaks {})",
                    hello.version,
                    proto::VERSION
                ),
                None,
            );
        }
        if !tls::same_secret(&hello.session, &self.session)
            || !tls::same_secret(&hello.token, &self.token)
        {
            return refuse_none(link, "wrong session or token", None);
        }
        let Some(key) = link.peer_fingerprint() else {
            return refuse_none(link, "no client key", None);
        };
        link.admit();
        let (generation, welcome) = match self.admit(&key, &link, &hello) {
            Ok(admitted) => admitted,
            Err((reason, retry)) => return refuse_none(link, &reason, retry),
        };
        if let Err(e) = link.send(proto::WELCOME, &[&proto::to_json(&welcome)]) {
            warn!("lost a connection from {}: {e}", link.peer);
            let mut state = lock(&self.state);
            if state.sender.as_ref().is_some_and(|s| s.1 == generation) {
                state.live -= 1;
            }
            return None;
        }
        Some((link, generation))
    }

    /// Binds the session to the first sender's key; lets it reconnect; lets a new sender
    /// take over from one that has gone quiet (a sender killed and run again).
    fn admit(
        &self,
        key: &str,
        link: &Link,
        hello: &Hello,
    ) -> std::result::Result<(u64, Welcome), (String, Option<u64>)> {
        let mut state = lock(&self.state);
        if state.stopped {
            return Err(("the receiver is stopping".into(), None));
        }
        match &state.sender {
            Some((bound, generation)) if bound == key => {
                // A reconnection (also while committing: the outcome is sent again); what
                // is held spares blocks whose acknowledgement was lost.
                let generation = *generation;
                state.live += 1;
                state.last_heard = Some(Instant::now());
                return Ok((generation, welcome(&state, true)));
            }
            _ if state.outcome.is_some() || state.committing => {
                return Err(("the transfer has ended".into(), None));
            }
            Some(_) if state.live > 0 => {
                // Taken over only once every connection of the other is gone. One that went
                // quiet may be dead (its connections end within DEAD_AFTER): worth a retry.
                let silent = state.last_heard.map_or(0, |t| t.elapsed().as_secs());
                return Err((
                    "another sender is transferring to this receiver".into(),
                    Some(silent),
                ));
            }
            Some(_) => info!("a new sender from {} takes over the transfer", link.peer),
            None => info!("sender {} ({}) connected", link.peer, hello.host),
        }
        // Files held of another source are not offered: SST names repeat across servers.
        let same_source = state.source_id.as_deref().is_none_or(|s| s == hello.source);
        if !same_source {
            warn!(
                "the sender backs up another server ({}) than the one this directory holds files of ({}): nothing held is reused",
                hello.source,
                state.source_id.as_deref().unwrap_or_default()
            );
        }
        if state.source_id.as_deref() != Some(hello.source.as_str()) {
            self.journal(&JournalLine::Source(hello.source.clone()))
                .map_err(|e| (e.to_string(), None))?;
            state.source_id = Some(hello.source.clone());
        }
        state.generation += 1;
        let generation = state.generation;
        state.sender = Some((key.to_string(), generation));
        state.live = 1;
        state.last_heard = Some(Instant::now());
        state.source = Some((link.peer.ip(), hello.host.clone()));
        Ok((generation, welcome(&state, same_source)))
    }

    fn current(&self, generation: u64) -> bool {
        let state = lock(&self.state);
        state.sender.as_ref().is_some_and(|s| s.1 == generation) && !state.stopped
    }

    fn heard(&self) {
        lock(&self.state).last_heard = Some(Instant::now());
    }

    fn serve(&self, link: &mut Link, generation: u64) -> Result<()> {
        loop {
            if !self.current(generation) {
                return Ok(());
            }
            let frame = link
                .recv(HEARTBEAT)
                .map_err(|e| Error::Network(e.to_string()))?;
            let Some(frame) = frame else {
                if link.last_heard.elapsed() > DEAD_AFTER {
                    return Err(Error::Network(format!(
                        "nothing heard for {} s",
                        DEAD_AFTER.as_secs()
                    )));
                }
                if link.last_sent.elapsed() >= HEARTBEAT {
                    send(link, proto::PING, &[])?;
                }
                continue;
            };
            self.heard();
            match frame.kind {
                proto::PING => {}
                proto::BLOCK => {
                    let (header, data) = BlockHeader::decode(&frame.body)?;
                    if crc32fast::hash(data) != header.crc32 {
                        // Never written: the sender sends it again on another connection.
                        return Err(Error::Network(format!(
                            "a block of {} arrived damaged (CRC-32 mismatch)",
                            header.path
                        )));
                    }
                    let done = self
                        .block(generation, header.path, header.offset, data, header.crc32)
                        .or_else(|e| self.fatal(link, e))?;
                    // The word on the file before the acknowledgement: a sender that saw
                    // the acknowledgement has seen the word.
                    if let Some(done) = done {
                        send(link, proto::FILE_DONE, &[&proto::to_json(&done)])?;
                    }
                    send(link, proto::ACK, &[&header.id.to_le_bytes()])?;
                }
                proto::END => {
                    let (id, rest) = proto::split_id(&frame.body)?;
                    let end: End = proto::from_json(rest)?;
                    let done = self.end(generation, end).or_else(|e| self.fatal(link, e))?;
                    if let Some(done) = done {
                        send(link, proto::FILE_DONE, &[&proto::to_json(&done)])?;
                    }
                    send(link, proto::ACK, &[&id.to_le_bytes()])?;
                }
                proto::COMMIT => {
                    let (id, manifest) = proto::split_id(&frame.body)?;
                    let outcome = self.commit(link, manifest);
                    let sent = match &outcome {
                        Ok(committed) => {
                            send(link, proto::COMMITTED, &[&proto::to_json(&**committed)])
                                .and_then(|()| send(link, proto::ACK, &[&id.to_le_bytes()]))
                        }
                        Err(reason) => send(link, proto::ABORT, &[reason.as_bytes()]),
                    };
                    let mut state = lock(&self.state);
                    state.outcome_sent = sent.is_ok();
                    drop(state);
                    self.changed.notify_all();
                    return sent;
                }
                proto::ABORT => {
                    let reason = String::from_utf8_lossy(&frame.body).into_owned();
                    let mut state = lock(&self.state);
                    state.ended = Some(Instant::now());
                    state.outcome_sent = true;
                    state.outcome = Some(Err(format!(
                        "the sender gave up: {reason}; {} keeps what arrived, and a receiver started on it again resumes",
                        self.root.display()
                    )));
                    drop(state);
                    self.changed.notify_all();
                    return Ok(());
                }
                other => {
                    return Err(Error::Network(format!("an unknown message ({other})")));
                }
            }
        }
    }

    /// A failure here (a full disk, an unsafe name) that sending again cannot cure: the
    /// sender hears why, and the session ends.
    fn fatal<T>(&self, link: &mut Link, e: Error) -> Result<T> {
        if matches!(e, Error::Network(_)) {
            return Err(e);
        }
        let reason = format!(
            "{e}; {} keeps what arrived, and a receiver started on it again resumes",
            self.root.display()
        );
        let _ = send(link, proto::ABORT, &[reason.as_bytes()]);
        let mut state = lock(&self.state);
        state.ended = Some(Instant::now());
        state.outcome_sent = true;
        state.outcome.get_or_insert(Err(reason));
        drop(state);
        self.changed.notify_all();
        Err(e)
    }

    /// Creates the parents of a file, once; returns its full path.
    fn prepare(&self, state: &mut State, path: &str) -> Result<PathBuf> {
        let parts = safe_components(path)?;
        let Some((name, parents)) = parts.split_last() else {
            return Err(Error::Corrupt(format!("a file named {path:?}")));
        };
        if parents.is_empty() && (*name == JOURNAL_NAME || *name == MANIFEST_NAME) {
            return Err(Error::Corrupt(format!("a file named {path:?}")));
        }
        let mut dir = self.root.clone();
        for part in parents {
            dir.push(part);
            if state.dirs.contains(&dir) {
                continue;
            }
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists && dir.is_dir() => {}
                Err(e) => return Err(Error::io(format!("cannot create {}", dir.display()), e)),
            }
            state.dirs.insert(dir.clone());
        }
        Ok(dir.join(name))
    }

    fn journal(&self, line: &JournalLine) -> Result<()> {
        let mut journal = lock(&self.journal);
        let mut bytes = proto::to_json(line);
        bytes.push(b'\n');
        journal
            .write_all(&bytes)
            .and_then(|()| journal.sync_data())
            .with_path("write", &self.root.join(JOURNAL_NAME))
    }

    /// Writes one block; says so when it completed its file.
    fn block(
        &self,
        generation: u64,
        path: &str,
        offset: u64,
        data: &[u8],
        crc32: u32,
    ) -> Result<Option<FileDone>> {
        let len = data.len() as u32;
        let file = {
            let mut state = lock(&self.state);
            superseded(&state, generation)?;
            if let Some((_, held_by)) = state.done.get(path) {
                if *held_by == generation {
                    // Sent again after a lost acknowledgement.
                    state.resent_blocks += 1;
                    return Ok(Some(FileDone {
                        path: path.to_string(),
                        problem: None,
                    }));
                }
            }
            if !state.parts.contains_key(path) {
                self.new_part(&mut state, path)?;
            }
            let part = state.parts.get_mut(path).expect("just made");
            if part.blocks.get(&offset) == Some(&(len, crc32)) {
                state.resent_blocks += 1;
                return Ok(None);
            }
            // Blocks this one overlaps are no longer what the file holds.
            let end = offset + len as u64;
            let stale: Vec<u64> = part
                .blocks
                .range(..end)
                .filter(|(&o, &(l, _))| o + l as u64 > offset)
                .map(|(&o, _)| o)
                .collect();
            for o in stale {
                part.blocks.remove(&o);
            }
            part.file.clone()
        };
        file.write_all_at(data, offset)
            .with_path("write", &self.root.join(path))?;
        self.written.fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut state = lock(&self.state);
        superseded(&state, generation)?;
        match state.parts.get_mut(path) {
            Some(part) => {
                part.blocks.insert(offset, (len, crc32));
            }
            None => return Ok(None),
        }
        self.try_complete(state, path)
    }

    fn end(&self, generation: u64, end: End) -> Result<Option<FileDone>> {
        let path = end.record.path.clone();
        let mut state = lock(&self.state);
        superseded(&state, generation)?;
        if let Some((held, _)) = state.done.get(&path) {
            // Held already, these very bytes (sent again, or by an earlier sender).
            if held.size == end.record.size && held.crc32 == end.record.crc32 {
                return Ok(Some(FileDone {
                    path,
                    problem: None,
                }));
            }
        }
        if !state.parts.contains_key(&path) {
            // An empty file has no blocks; the blocks of another may still be on their way
            // over other connections.
            self.new_part(&mut state, &path)?;
        }
        let part = state.parts.get_mut(&path).expect("present");
        part.end = Some(end);
        self.try_complete(state, &path)
    }

    /// Starts receiving a file (again, when a sender sends a file held: not an SST, its
    /// content may differ).
    fn new_part(&self, state: &mut State, path: &str) -> Result<()> {
        if state.done.remove(path).is_some() {
            self.journal(&JournalLine::Removed(path.to_string()))?;
        }
        let full = self.prepare(state, path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .open(&full)
            .with_path("create", &full)?;
        state.parts.insert(
            path.to_string(),
            Part {
                file: Arc::new(file),
                blocks: BTreeMap::new(),
                end: None,
                finishing: false,
            },
        );
        Ok(())
    }

    /// Completes a file once every block its end lists is held as listed: truncates,
    /// syncs, reads it back and checks it against the sender's CRC-32, journals it.
    fn try_complete(&self, mut state: MutexGuard<State>, path: &str) -> Result<Option<FileDone>> {
        let Some(part) = state.parts.get_mut(path) else {
            return Ok(None);
        };
        let Some(end) = &part.end else {
            return Ok(None);
        };
        if part.finishing
            || !end
                .blocks
                .iter()
                .all(|&(o, l, c)| part.blocks.get(&o) == Some(&(l, c)))
        {
            return Ok(None);
        }
        part.finishing = true;
        let record = end.record.clone();
        let file = part.file.clone();
        drop(state);
        let full = self.root.join(path);
        file.set_len(record.size)
            .and_then(|()| file.sync_all())
            .with_path("sync", &full)?;
        let (size, crc32) = crc_of(&full)?;
        let problem = (size != record.size || crc32 != record.crc32).then(|| {
            format!(
                "{path} as written ({size} bytes, CRC-32 {crc32:08x}) is not what was sent ({} bytes, CRC-32 {:08x})",
                record.size, record.crc32
            )
        });
        match &problem {
            None => self.journal(&JournalLine::Done(record.clone()))?,
            Some(p) => warn!("{p}"),
        }
        let mut state = lock(&self.state);
        let generation = state.sender.as_ref().map_or(0, |s| s.1);
        state.parts.remove(path);
        match &problem {
            None => {
                state.done.insert(path.to_string(), (record, generation));
            }
            Some(_) => {
                let _ = fs::remove_file(&full);
            }
        }
        Ok(Some(FileDone {
            path: path.to_string(),
            problem,
        }))
    }

    /// The manifest arrived: checks every file it lists, removes leftovers, publishes it;
    /// runs the work that follows (a restore). Keeps the connection alive meanwhile.
    fn commit(
        &self,
        link: &mut Link,
        manifest: &[u8],
    ) -> std::result::Result<Arc<Committed>, String> {
        {
            let mut state = lock(&self.state);
            loop {
                match &state.outcome {
                    Some(outcome) => return outcome.clone(),
                    None if state.committing => {
                        state = self
                            .changed
                            .wait_timeout(state, HEARTBEAT)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                        drop(state);
                        let _ = send(link, proto::PING, &[]);
                        state = lock(&self.state);
                    }
                    None => break,
                }
            }
            state.committing = true;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _ = tx.send(self.publish(manifest));
            });
            loop {
                match rx.recv_timeout(HEARTBEAT) {
                    Ok(outcome) => {
                        let outcome = outcome.map(Arc::new).map_err(|e| e.to_string());
                        let mut state = lock(&self.state);
                        state.committing = false;
                        state.ended = Some(Instant::now());
                        state.outcome = Some(outcome.clone());
                        drop(state);
                        self.changed.notify_all();
                        return outcome;
                    }
                    Err(_) => {
                        let _ = send(link, proto::PING, &[]);
                    }
                }
            }
        })
    }

    fn publish(&self, manifest_bytes: &[u8]) -> Result<Committed> {
        let manifest: Manifest<serde_json::Value> = serde_json::from_slice(manifest_bytes)
            .map_err(|e| Error::Corrupt(format!("the manifest sent is not valid: {e}")))?;
        let (leftovers, dirs) = {
            let mut state = lock(&self.state);
            let mut problems = Vec::new();
            for file in &manifest.files {
                match state.done.get(&file.path) {
                    Some((held, _)) if held.size == file.size && held.crc32 == file.crc32 => {}
                    Some(_) => problems.push(format!("{} differs from what arrived", file.path)),
                    None => problems.push(format!("{} never arrived", file.path)),
                }
            }
            if !problems.is_empty() {
                let shown = problems
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(Error::Network(format!(
                    "the backup is incomplete: {} of its files are not held ({shown})",
                    problems.len()
                )));
            }
            let listed: std::collections::HashSet<&str> =
                manifest.files.iter().map(|f| f.path.as_str()).collect();
            let mut leftovers: Vec<String> = state
                .done
                .keys()
                .filter(|p| !listed.contains(p.as_str()))
                .cloned()
                .collect();
            leftovers.extend(state.parts.keys().cloned());
            state.parts.clear();
            for path in &leftovers {
                state.done.remove(path);
            }
            let mut dirs: Vec<PathBuf> = state.dirs.iter().cloned().collect();
            dirs.sort();
            (leftovers, dirs)
        };
        for path in &leftovers {
            let full = self.root.join(path);
            match fs::remove_file(&full) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("cannot remove {}", full.display()), e)),
            }
        }
        for dir in dirs.iter().rev() {
            if fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none()) {
                let _ = fs::remove_dir(dir);
            } else {
                sync_dir(dir)?;
            }
        }
        sync_dir(&self.root)?;
        publish_manifest(&self.root, manifest_bytes)?;
        let journal = self.root.join(JOURNAL_NAME);
        fs::remove_file(&journal).with_path("remove", &journal)?;
        sync_dir(&self.root)?;
        let received = {
            let state = lock(&self.state);
            let (sender, sender_host) = state
                .source
                .clone()
                .unwrap_or((IpAddr::from([0, 0, 0, 0]), String::new()));
            Received {
                manifest,
                sender,
                sender_host,
                resent_blocks: state.resent_blocks,
            }
        };
        info!(
            "Received a complete backup into {}: {} files, {}",
            self.root.display(),
            received.manifest.files.len(),
            crate::log::human(received.manifest.files.iter().map(|f| f.size).sum())
        );
        let report = match &*lock(&self.after_commit) {
            Some(work) => work(&received)?,
            None => Vec::new(),
        };
        lock(&self.state).received = Some(received);
        Ok(Committed { report })
    }
}

fn send(link: &mut Link, kind: u8, parts: &[&[u8]]) -> Result<()> {
    link.send(kind, parts)
        .map_err(|e| Error::Network(e.to_string()))
}
