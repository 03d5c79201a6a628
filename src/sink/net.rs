//! A receiver over the network as a sink. The chunks of every file go into one queue that N
//! connection threads drain, so one large SST travels over all connections at once. Each
//! connection keeps at most [`WINDOW`] bytes unacknowledged; when a connection dies, its
//! unacknowledged blocks go back to the queue and it reconnects (the other connections
//! carry on), so a cut path costs at most one window per connection sent twice. A file's
//! bytes stay here until acknowledged; the receiver's word that it synced and checked the
//! whole file is collected meanwhile, and the manifest goes once every word is in.
//!
//! A receiver that already holds files (a transfer resumed) says so when a sender connects:
//! SSTs it holds whole are not read at all, and blocks of a file it holds in part are not
//! sent again when their offset, length and CRC-32 match.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rustls::ClientConfig;

use super::{Chunk, Sink, SinkFile};
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::format::manifest::{FileRecord, Kind};
use crate::format::{FileMeta, CHUNK_SIZE};
use crate::net::link::{Frame, Link, CONNECT_TIMEOUT, DEAD_AFTER, HEARTBEAT};
use crate::net::proto::{self, BlockHeader, Committed, End, FileDone, Hello, Refused, Welcome};
use crate::net::tls::{self, Identity};
use crate::net::Url;
use crate::pipeline::Buf;
use crate::{info, warn};

/// Bytes a connection may have sent and not yet seen acknowledged.
pub const WINDOW: usize = 4 << 20;
/// Connections when neither side says.
pub const DEFAULT_STREAMS: usize = 8;
/// How long a connection keeps trying to reconnect before the transfer fails.
const RECONNECT_FOR: Duration = Duration::from_secs(60);
/// How long a sender waits for another one that was just heard from (a sender killed an
/// instant ago), and how long one must be silent to be waited for longer.
const TAKEOVER_GRACE: Duration = Duration::from_secs(5);
const QUIET_SECS: u64 = 3;
/// How long a sender waits for another one, gone quiet, to be let go by the receiver (its
/// connections end within `DEAD_AFTER` if it is dead).
const BUSY_FOR: Duration = Duration::from_secs(DEAD_AFTER.as_secs() + 10);

enum Out {
    Block {
        id: u64,
        path: Arc<str>,
        offset: u64,
        crc32: u32,
        data: Buf,
        /// Sent before, on a connection that was lost.
        again: bool,
    },
    End {
        id: u64,
        record: Vec<u8>,
    },
    Commit {
        id: u64,
        manifest: Arc<Vec<u8>>,
    },
}

impl Out {
    fn id(&self) -> u64 {
        match self {
            Out::Block { id, .. } | Out::End { id, .. } | Out::Commit { id, .. } => *id,
        }
    }

    fn len(&self) -> usize {
        match self {
            Out::Block { data, .. } => data.len(),
            Out::End { record, .. } => record.len(),
            Out::Commit { manifest, .. } => manifest.len(),
        }
    }

    fn send(&self, link: &mut Link) -> std::io::Result<()> {
        match self {
            Out::Block {
                id,
                path,
                offset,
                crc32,
                data,
                ..
            } => {
                let header = BlockHeader {
                    id: *id,
                    offset: *offset,
                    crc32: *crc32,
                    path,
                };
                link.send(proto::BLOCK, &[&header.encode(), data])
            }
            Out::End { id, record } => link.send(proto::END, &[&id.to_le_bytes(), record]),
            Out::Commit { id, manifest } => {
                link.send(proto::COMMIT, &[&id.to_le_bytes(), manifest])
            }
        }
    }
}

/// A file whose end was sent: its record, and the receiver's word once it came (`None`
/// when accepted, the problem otherwise).
struct Pending {
    record: FileRecord,
    word: Option<Option<String>>,
}

#[derive(Default)]
struct State {
    /// Files whose end was sent, and the receiver's word on them once it came.
    files: HashMap<String, Pending>,
    committed: Option<Committed>,
    failed: Option<String>,
}

/// Transfer figures, for the log and the report.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Figures {
    pub streams: usize,
    pub bytes_sent: u64,
    /// Block bytes sent again after a connection was lost.
    pub bytes_resent: u64,
    /// Bytes the receiver already held (a resumed transfer).
    pub bytes_held: u64,
    pub reconnects: u64,
}

struct Shared {
    url: Url,
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    hello: Vec<u8>,
    queue: Receiver<Out>,
    retry: Mutex<VecDeque<Out>>,
    state: Mutex<State>,
    changed: Condvar,
    done: AtomicBool,
    sent: AtomicU64,
    resent: AtomicU64,
    held: AtomicU64,
    reconnects: AtomicU64,
    /// Handles on the connections' sockets, to cut them when giving up (a write to a
    /// receiver that stopped reading would otherwise wait for DEAD_AFTER).
    sockets: Mutex<Vec<std::sync::Weak<std::net::TcpStream>>>,
}

pub struct NetSink {
    cancel: Cancel,
    shared: Arc<Shared>,
    queue: Sender<Out>,
    next_id: AtomicU64,
    workers: Mutex<Vec<JoinHandle<()>>>,
    streams: usize,
    held: HashMap<String, FileRecord>,
    partial: HashMap<String, HashMap<u64, (u32, u32)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NetSink {
    /// Connects to the receiver at `url` with `streams` connections (the URL's number when
    /// none is given). `source` names the server backed up.
    /// A stop signal (`cancel`) ends waits for room in the queue.
    pub fn connect(
        url: &Url,
        streams: Option<usize>,
        source: String,
        cancel: Cancel,
    ) -> Result<NetSink> {
        let streams = streams
            .or((url.streams > 0).then_some(url.streams))
            .unwrap_or(DEFAULT_STREAMS)
            .max(1);
        let identity = Identity::generate()?;
        let hello = proto::to_json(&Hello {
            version: proto::VERSION,
            session: url.session.clone(),
            token: url.token.clone(),
            host: crate::sys::hostname(),
            source,
        });
        let (tx, rx) = crossbeam_channel::bounded(2 * streams);
        let shared = Arc::new(Shared {
            url: url.clone(),
            addr: url.addr()?,
            config: tls::client_config(&identity, &url.fingerprint)?,
            hello,
            queue: rx,
            retry: Mutex::new(VecDeque::new()),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            done: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            held: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            sockets: Mutex::new(Vec::new()),
        });
        // The first connection learns what the receiver holds; a receiver busy with another
        // sender that is going away is waited for, a while.
        let started = Instant::now();
        let (link, welcome) = loop {
            match shared.connect() {
                Ok(pair) => break pair,
                // The other sender may have just died (a sender killed and run again): its
                // connections are being closed. One silent for a while may be dead: its
                // connections end within DEAD_AFTER.
                Err(Connect::Busy(reason, silent))
                    if started.elapsed() < TAKEOVER_GRACE
                        || (silent >= QUIET_SECS && started.elapsed() < BUSY_FOR) =>
                {
                    info!("The receiver is busy ({reason}); trying again");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(Connect::Busy(reason, _)) | Err(Connect::Refused(reason)) => {
                    return Err(Error::Network(format!(
                        "the receiver at {}:{} refused this sender: {reason}",
                        url.host, url.port
                    )))
                }
                Err(Connect::Failed(e)) => {
                    return Err(Error::Network(format!(
                        "cannot connect to the receiver at {}:{}: {e}",
                        url.host, url.port
                    )))
                }
            }
        };
        let held: HashMap<String, FileRecord> = welcome
            .held
            .into_iter()
            .map(|r| (r.path.clone(), r))
            .collect();
        let partial = welcome
            .partial
            .into_iter()
            .map(|p| {
                let blocks = p.blocks.into_iter().map(|(o, l, c)| (o, (l, c))).collect();
                (p.path, blocks)
            })
            .collect();
        info!(
            "Connected to the receiver at {}:{} ({} connections{})",
            url.host,
            url.port,
            streams,
            match held.len() {
                0 => String::new(),
                n => format!("; it already holds {n} files"),
            }
        );
        let mut workers = Vec::new();
        let mut first = Some(link);
        for n in 0..streams {
            let shared = shared.clone();
            let link = first.take();
            workers.push(std::thread::spawn(move || shared.worker(n, link)));
        }
        Ok(NetSink {
            cancel,
            shared,
            queue: tx,
            next_id: AtomicU64::new(1),
            workers: Mutex::new(workers),
            streams,
            held,
            partial,
        })
    }

    pub fn url(&self) -> &Url {
        &self.shared.url
    }

    pub fn figures(&self) -> Figures {
        Figures {
            streams: self.streams,
            bytes_sent: self.shared.sent.load(Ordering::Relaxed),
            bytes_resent: self.shared.resent.load(Ordering::Relaxed),
            bytes_held: self.shared.held.load(Ordering::Relaxed),
            reconnects: self.shared.reconnects.load(Ordering::Relaxed),
        }
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues a message, unless the transfer failed.
    fn put(&self, mut out: Out) -> Result<()> {
        loop {
            self.shared.check()?;
            self.cancel.check()?;
            match self.queue.send_timeout(out, HEARTBEAT) {
                Ok(()) => return Ok(()),
                Err(crossbeam_channel::SendTimeoutError::Timeout(back)) => out = back,
                Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => {
                    return Err(Error::Closed)
                }
            }
        }
    }

    fn stop(&self) {
        self.shared.done.store(true, Ordering::Relaxed);
        for worker in lock(&self.workers).drain(..) {
            let _ = worker.join();
        }
    }
}

impl Sink for NetSink {
    fn max_in_flight(&self) -> usize {
        usize::MAX
    }

    /// SSTs are immutable: one the receiver holds whole, same name and size, is the same.
    fn lookup(&self, meta: &FileMeta, size: u64) -> Result<Option<FileRecord>> {
        if meta.kind != Kind::Sst {
            return Ok(None);
        }
        let held = self
            .held
            .get(&meta.path)
            .filter(|r| r.kind == Kind::Sst && r.original_size() == size)
            .cloned();
        if let Some(record) = &held {
            self.shared.held.fetch_add(record.size, Ordering::Relaxed);
        }
        Ok(held)
    }

    fn open(&self, meta: &FileMeta) -> Result<Box<dyn SinkFile + '_>> {
        self.shared.check()?;
        let held = match meta.kind {
            Kind::Sst => self.partial.get(&meta.path),
            _ => None,
        };
        Ok(Box::new(NetFile {
            sink: self,
            path: meta.path.as_str().into(),
            offset: 0,
            blocks: Vec::new(),
            held,
        }))
    }

    /// Waits for the receiver's word on every file (each synced, read back and checked
    /// there), then sends the manifest and waits for the commit.
    fn commit(&self, manifest: &[u8]) -> Result<()> {
        self.shared
            .wait_for(|state| state.files.values().all(|p| p.word.is_some()).then_some(()))?;
        self.put(Out::Commit {
            id: self.id(),
            manifest: Arc::new(manifest.to_vec()),
        })?;
        let committed = self.shared.wait_for(|state| state.committed.take())?;
        self.stop();
        for line in committed.report {
            info!("Receiver: {line}");
        }
        let f = self.figures();
        info!(
            "Sent {} over {} connections ({} sent again after lost connections, {} reconnects; {} already held by the receiver)",
            crate::log::human(f.bytes_sent),
            f.streams,
            crate::log::human(f.bytes_resent),
            f.reconnects,
            crate::log::human(f.bytes_held)
        );
        Ok(())
    }

    fn abort(&self) -> Option<Error> {
        let failure = lock(&self.shared.state).failed.clone();
        if failure.is_none() {
            // Tell the receiver, on one connection, that this sender gives up.
            if let Ok((mut link, _)) = self.shared.connect() {
                let _ = link.send(proto::ABORT, &[b"the backup failed on the sending host"]);
                let _ = link.recv(Duration::from_millis(500));
                link.close();
            }
        }
        lock(&self.shared.state)
            .failed
            .get_or_insert_with(|| "aborted".into());
        for socket in lock(&self.shared.sockets).drain(..) {
            if let Some(socket) = socket.upgrade() {
                let _ = socket.shutdown(std::net::Shutdown::Both);
            }
        }
        self.stop();
        failure.map(Error::Network)
    }
}

impl Drop for NetSink {
    fn drop(&mut self) {
        self.stop();
    }
}

struct NetFile<'a> {
    sink: &'a NetSink,
    path: Arc<str>,
    offset: u64,
    /// Every block of the file so far, sent or held: `(offset, length, CRC-32)`.
    blocks: Vec<(u64, u32, u32)>,
    /// Blocks of this file the receiver holds already.
    held: Option<&'a HashMap<u64, (u32, u32)>>,
}

impl SinkFile for NetFile<'_> {
    fn write(&mut self, chunk: Chunk) -> Result<()> {
        let len = chunk.data.len();
        let offset = self.offset;
        self.offset += len as u64;
        self.blocks.push((offset, len as u32, chunk.crc32));
        if self
            .held
            .is_some_and(|h| h.get(&offset) == Some(&(len as u32, chunk.crc32)))
        {
            self.sink
                .shared
                .held
                .fetch_add(len as u64, Ordering::Relaxed);
            return Ok(());
        }
        self.sink.put(Out::Block {
            id: self.sink.id(),
            path: self.path.clone(),
            offset,
            crc32: chunk.crc32,
            data: chunk.data,
            again: false,
        })
    }

    /// Returns once the end is queued: see [`NetSink::commit`] for the receiver's word.
    fn finish(self: Box<Self>, record: &FileRecord) -> Result<()> {
        let shared = &self.sink.shared;
        lock(&shared.state).files.insert(
            self.path.to_string(),
            Pending {
                record: record.clone(),
                word: None,
            },
        );
        let end = End {
            record: record.clone(),
            blocks: self.blocks.clone(),
        };
        // The file's bytes stay here until the receiver acknowledges them (an SST's in its
        // mapping, which outlives the checkpoint's link), so the next file need not wait a
        // round trip for the receiver's word on this one: the commit waits for every word.
        self.sink.put(Out::End {
            id: self.sink.id(),
            record: proto::to_json(&end),
        })
    }
}

enum Connect {
    /// Another sender holds the receiver, silent for so many seconds.
    Busy(String, u64),
    Refused(String),
    Failed(String),
}

impl Shared {
    fn check(&self) -> Result<()> {
        match &lock(&self.state).failed {
            Some(reason) => Err(Error::Network(reason.clone())),
            None => Ok(()),
        }
    }

    /// Waits until `ready` gives a value, or the transfer fails.
    fn wait_for<T>(&self, mut ready: impl FnMut(&mut State) -> Option<T>) -> Result<T> {
        let mut state = lock(&self.state);
        loop {
            if let Some(reason) = &state.failed {
                return Err(Error::Network(reason.clone()));
            }
            if let Some(value) = ready(&mut state) {
                return Ok(value);
            }
            state = self
                .changed
                .wait_timeout(state, HEARTBEAT)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn fail(&self, reason: String) {
        lock(&self.state).failed.get_or_insert(reason);
        self.changed.notify_all();
        // Buffers held here go back to the pipeline's pools: readers waiting for one wake
        // up and see the failure.
        lock(&self.retry).clear();
        while self.queue.try_recv().is_ok() {}
    }

    fn connect(&self) -> std::result::Result<(Link, Welcome), Connect> {
        let failed = |e: std::io::Error| Connect::Failed(e.to_string());
        let mut link = Link::connect(self.addr, self.config.clone()).map_err(failed)?;
        let mut sockets = lock(&self.sockets);
        // Handles of connections gone are dropped along the way.
        sockets.retain(|s| s.strong_count() > 0);
        sockets.push(link.socket());
        drop(sockets);
        // The receiver proved it holds the URL's key: its frames may be large.
        link.admit();
        link.send(proto::HELLO, &[&self.hello]).map_err(failed)?;
        match link.recv(CONNECT_TIMEOUT).map_err(failed)? {
            Some(Frame {
                kind: proto::WELCOME,
                body,
            }) => {
                let welcome =
                    proto::from_json(&body).map_err(|e| Connect::Failed(e.to_string()))?;
                Ok((link, welcome))
            }
            Some(Frame {
                kind: proto::REFUSED,
                body,
            }) => {
                let refused: Refused =
                    proto::from_json(&body).map_err(|e| Connect::Failed(e.to_string()))?;
                Err(match refused.retry {
                    true => Connect::Busy(refused.reason, refused.other_silent_secs),
                    false => Connect::Refused(refused.reason),
                })
            }
            _ => Err(Connect::Failed("the receiver did not answer".into())),
        }
    }

    /// One connection: sends while its window has room, and reconnects when it is lost.
    fn worker(&self, n: usize, mut link: Option<Link>) {
        let mut down_since: Option<Instant> = None;
        let mut pause = Duration::from_millis(200);
        while !self.done.load(Ordering::Relaxed) && lock(&self.state).failed.is_none() {
            let mut current = match link.take() {
                Some(l) => l,
                None => match self.connect() {
                    Ok((l, welcome)) => {
                        if down_since.take().is_some() {
                            self.reconnects.fetch_add(1, Ordering::Relaxed);
                            info!("Connection {n} to the receiver is back");
                        }
                        self.drop_held(&welcome);
                        pause = Duration::from_millis(200);
                        l
                    }
                    Err(Connect::Refused(reason)) | Err(Connect::Busy(reason, _)) => {
                        return self.fail(format!("the receiver refused a connection: {reason}"));
                    }
                    Err(Connect::Failed(e)) => {
                        let since = *down_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > RECONNECT_FOR {
                            return self.fail(format!(
                                "the receiver at {}:{} cannot be reached for {} s ({e}); a receiver started again prints a new URL",
                                self.url.host,
                                self.url.port,
                                RECONNECT_FOR.as_secs()
                            ));
                        }
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_secs(2));
                        continue;
                    }
                },
            };
            let mut unacked = VecDeque::new();
            match self.pump(&mut current, &mut unacked) {
                Ok(()) => {
                    current.close();
                    return;
                }
                Err(e) => {
                    if self.done.load(Ordering::Relaxed) || lock(&self.state).failed.is_some() {
                        return;
                    }
                    warn!("Connection {n} to the receiver lost: {e}; reconnecting");
                    down_since = Some(Instant::now());
                    let mut retry = lock(&self.retry);
                    for mut out in unacked.into_iter().rev() {
                        if let Out::Block { again, .. } = &mut out {
                            *again = true;
                        }
                        retry.push_front(out);
                    }
                }
            }
        }
    }

    /// Forgets blocks waiting to go again that the receiver says it holds: they arrived
    /// before their connection was lost, and only the acknowledgement did not.
    fn drop_held(&self, welcome: &Welcome) {
        // A file held whole, exactly as sent, is done even if the word was lost.
        let mut state = lock(&self.state);
        for held in &welcome.held {
            if let Some(pending) = state.files.get_mut(&held.path) {
                if pending.record.size == held.size && pending.record.crc32 == held.crc32 {
                    pending.word.get_or_insert(None);
                }
            }
        }
        drop(state);
        self.changed.notify_all();
        let mut retry = lock(&self.retry);
        if retry.is_empty() {
            return;
        }
        // Files held whole exactly as this sender sent them.
        let state = lock(&self.state);
        let whole: std::collections::HashSet<&str> = welcome
            .held
            .iter()
            .filter(|h| {
                state
                    .files
                    .get(&h.path)
                    .is_some_and(|p| p.record.size == h.size && p.record.crc32 == h.crc32)
            })
            .map(|r| r.path.as_str())
            .collect();
        drop(state);
        let blocks: std::collections::HashSet<(&str, u64, u32, u32)> = welcome
            .partial
            .iter()
            .flat_map(|p| p.blocks.iter().map(|&(o, l, c)| (p.path.as_str(), o, l, c)))
            .collect();
        retry.retain(|out| match out {
            Out::Block {
                path,
                offset,
                crc32,
                data,
                ..
            } => {
                !whole.contains(&**path)
                    && !blocks.contains(&(&**path, *offset, data.len() as u32, *crc32))
            }
            _ => true,
        });
    }

    fn next(&self, wait: Duration) -> Option<Out> {
        if let Some(out) = lock(&self.retry).pop_front() {
            return Some(out);
        }
        self.queue.recv_timeout(wait).ok()
    }

    fn pump(&self, link: &mut Link, unacked: &mut VecDeque<Out>) -> Result<()> {
        let io = |e: std::io::Error| Error::Network(e.to_string());
        loop {
            while let Some(frame) = link.recv(Duration::ZERO).map_err(io)? {
                self.handle(frame, unacked)?;
            }
            if self.done.load(Ordering::Relaxed) {
                return Ok(());
            }
            if let Some(reason) = &lock(&self.state).failed {
                return Err(Error::Network(reason.clone()));
            }
            if link.last_heard.elapsed() > DEAD_AFTER {
                return Err(Error::Network(format!(
                    "nothing heard for {} s",
                    DEAD_AFTER.as_secs()
                )));
            }
            let in_flight: usize = unacked.iter().map(Out::len).sum();
            let out = match in_flight + CHUNK_SIZE <= WINDOW {
                true => self.next(match unacked.is_empty() {
                    true => Duration::from_millis(100),
                    false => Duration::from_millis(2),
                }),
                false => {
                    if let Some(frame) = link.recv(Duration::from_millis(100)).map_err(io)? {
                        self.handle(frame, unacked)?;
                    }
                    None
                }
            };
            match out {
                Some(out) => {
                    // Queued before it is sent: if the send fails, it is sent again.
                    let len = out.len() as u64;
                    let (block, again) = match &out {
                        Out::Block { again, .. } => (true, *again),
                        _ => (false, false),
                    };
                    unacked.push_back(out);
                    unacked
                        .back()
                        .expect("just pushed")
                        .send(link)
                        .map_err(io)?;
                    if block {
                        self.sent.fetch_add(len, Ordering::Relaxed);
                    }
                    if again {
                        self.resent.fetch_add(len, Ordering::Relaxed);
                    }
                }
                None if link.last_sent.elapsed() >= HEARTBEAT => {
                    link.send(proto::PING, &[]).map_err(io)?;
                }
                None => {}
            }
        }
    }

    fn handle(&self, frame: Frame, unacked: &mut VecDeque<Out>) -> Result<()> {
        match frame.kind {
            proto::PING => {}
            proto::ACK => {
                let (id, _) = proto::split_id(&frame.body)?;
                if let Some(i) = unacked.iter().position(|o| o.id() == id) {
                    unacked.remove(i);
                }
            }
            proto::FILE_DONE => {
                let done: FileDone = proto::from_json(&frame.body)?;
                let mut state = lock(&self.state);
                if let Some(pending) = state.files.get_mut(&done.path) {
                    pending.word = Some(done.problem.clone());
                }
                drop(state);
                self.changed.notify_all();
                if let Some(problem) = done.problem {
                    self.fail(format!(
                        "the receiver did not accept {}: {problem}",
                        done.path
                    ));
                }
            }
            proto::COMMITTED => {
                let committed: Committed = proto::from_json(&frame.body)?;
                self.done.store(true, Ordering::Relaxed);
                lock(&self.state).committed = Some(committed);
                self.changed.notify_all();
            }
            proto::ABORT => {
                let reason = String::from_utf8_lossy(&frame.body).into_owned();
                self.fail(format!("the receiver gave up: {reason}"));
                return Err(Error::Network(reason));
            }
            other => {
                return Err(Error::Network(format!(
                    "an unexpected message ({other}) from the receiver"
                )))
            }
        }
        Ok(())
    }
}
