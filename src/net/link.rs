//! One TLS connection carrying frames: a kind byte, a 32-bit little-endian length, then the
//! body. One thread drives each connection, sending and receiving in turn, so the TLS state
//! is never shared; sockets fail on a dead path within [`DEAD_AFTER`].

use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

/// Quiet time after which a side sends a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Silence (or unacknowledged bytes) after which a connection is declared dead. Longer
/// than a short outage plus TCP's retransmission back-off, so that a connection outlives
/// a blip and resumes by itself, with nothing sent twice.
pub const DEAD_AFTER: Duration = Duration::from_secs(20);
/// Time a connection or its handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest frame body accepted from an admitted peer (a manifest of many files); and
/// from one not yet admitted (a hello).
pub const MAX_FRAME: usize = 256 << 20;
const MAX_FRAME_BEFORE_ADMISSION: usize = 64 << 10;
/// Socket reads, buffered: TLS reads records a few KiB at a time.
const READ_BUFFER: usize = 256 << 10;
/// Plaintext handed to TLS at a time, so that its buffers stay small.
const PIECE: usize = 64 << 10;

pub struct Frame {
    pub kind: u8,
    pub body: Vec<u8>,
}

pub struct Link {
    tls: Connection,
    sock: Arc<TcpStream>,
    reader: BufReader<TcpStream>,
    inbuf: Vec<u8>,
    max_frame: usize,
    pub peer: SocketAddr,
    pub last_sent: Instant,
    /// When bytes last arrived (a slow link carrying one large frame is alive).
    pub last_heard: Instant,
}

fn tune(sock: &TcpStream) -> io::Result<()> {
    sock.set_nodelay(true)?;
    crate::sys::set_tcp_user_timeout(sock, DEAD_AFTER.as_millis() as u32);
    sock.set_write_timeout(Some(DEAD_AFTER))?;
    Ok(())
}

impl Link {
    /// Connects to a receiver and completes the handshake (which checks its key).
    pub fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> io::Result<Link> {
        let sock = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        let tls = ClientConnection::new(config, super::tls::server_name())
            .map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
        Link::handshake(sock, tls.into(), addr)
    }

    /// Completes the handshake of a connection a receiver accepted.
    pub fn accept(sock: TcpStream, config: Arc<ServerConfig>) -> io::Result<Link> {
        let peer = sock.peer_addr()?;
        let tls =
            ServerConnection::new(config).map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
        Link::handshake(sock, tls.into(), peer)
    }

    /// The handshake, within [`CONNECT_TIMEOUT`] in all (a peer trickling bytes does not
    /// hold it open).
    fn handshake(mut sock: TcpStream, mut tls: Connection, peer: SocketAddr) -> io::Result<Link> {
        tune(&sock)?;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let timed_out = || io::Error::new(ErrorKind::TimedOut, "the TLS handshake took too long");
        while tls.is_handshaking() {
            while tls.wants_write() {
                tls.write_tls(&mut sock)?;
            }
            if !tls.is_handshaking() {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !crate::sys::wait_readable(&sock, left)? {
                return Err(timed_out());
            }
            if tls.read_tls(&mut sock)? == 0 {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the handshake",
                ));
            }
            if let Err(e) = tls.process_new_packets() {
                // Tell the peer why (an alert), if the socket still takes it.
                let _ = tls.write_tls(&mut sock);
                return Err(io::Error::new(ErrorKind::InvalidData, e));
            }
        }
        while tls.wants_write() {
            tls.write_tls(&mut sock)?;
        }
        let reader = BufReader::with_capacity(READ_BUFFER, sock.try_clone()?);
        Ok(Link {
            tls,
            sock: Arc::new(sock),
            reader,
            inbuf: Vec::new(),
            max_frame: MAX_FRAME_BEFORE_ADMISSION,
            peer,
            last_sent: Instant::now(),
            last_heard: Instant::now(),
        })
    }

    /// A handle on the socket, to cut the connection from another thread (it does not keep
    /// the connection open).
    pub fn socket(&self) -> Weak<TcpStream> {
        Arc::downgrade(&self.sock)
    }

    /// Lets the peer send frames of any size the protocol uses (once it is admitted).
    pub fn admit(&mut self) {
        self.max_frame = MAX_FRAME;
    }

    /// The fingerprint of the key the peer proved it holds.
    pub fn peer_fingerprint(&self) -> Option<String> {
        self.tls
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| super::tls::fingerprint(c))
    }

    /// Sends one frame whose body is the concatenation of `parts`.
    pub fn send(&mut self, kind: u8, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut header = [0u8; 5];
        header[0] = kind;
        header[1..].copy_from_slice(&(len as u32).to_le_bytes());
        self.put(&header)?;
        for part in parts {
            for piece in part.chunks(PIECE) {
                self.put(piece)?;
            }
        }
        self.last_sent = Instant::now();
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tls.writer().write_all(bytes)?;
        while self.tls.wants_write() {
            self.tls.write_tls(&mut &*self.sock)?;
        }
        Ok(())
    }

    /// The next frame, if one arrives within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Option<Frame>> {
        let deadline = Instant::now() + timeout;
        // Records read along with the handshake, or with an earlier frame, come first.
        let mut fresh = true;
        loop {
            if let Some(frame) = self.take_frame()? {
                return Ok(Some(frame));
            }
            if !fresh {
                let wait = deadline.saturating_duration_since(Instant::now());
                if self.reader.buffer().is_empty() && !crate::sys::wait_readable(&*self.sock, wait)?
                {
                    return Ok(None);
                }
                match self.tls.read_tls(&mut self.reader) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            ErrorKind::UnexpectedEof,
                            "the peer closed the connection",
                        ))
                    }
                    Ok(_) => self.last_heard = Instant::now(),
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            fresh = false;
            let state = match self.tls.process_new_packets() {
                Ok(state) => state,
                Err(e) => {
                    let _ = self.tls.write_tls(&mut &*self.sock);
                    return Err(io::Error::new(ErrorKind::InvalidData, e));
                }
            };
            let available = state.plaintext_bytes_to_read();
            let closed = state.peer_has_closed();
            if available > 0 {
                let start = self.inbuf.len();
                self.inbuf.resize(start + available, 0);
                self.tls.reader().read_exact(&mut self.inbuf[start..])?;
            }
            while self.tls.wants_write() {
                self.tls.write_tls(&mut &*self.sock)?;
            }
            if closed && available == 0 && self.inbuf.len() < 5 {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                ));
            }
        }
    }

    fn take_frame(&mut self) -> io::Result<Option<Frame>> {
        if self.inbuf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.inbuf[1..5].try_into().expect("4 bytes")) as usize;
        if len > self.max_frame {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("a frame of {len} bytes is larger than any the protocol sends"),
            ));
        }
        if self.inbuf.len() < 5 + len {
            return Ok(None);
        }
        let kind = self.inbuf[0];
        let body = self.inbuf[5..5 + len].to_vec();
        self.inbuf.drain(..5 + len);
        Ok(Some(Frame { kind, body }))
    }

    /// Ends the connection politely (the peer sees a close, not a reset).
    pub fn close(mut self) {
        self.tls.send_close_notify();
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut &*self.sock).is_err() {
                break;
            }
        }
    }
}
