//! A replication connection: just enough of the client protocol to log in, register as a
//! replica and read MariaDB's binary log dump as raw events.
//!
//! Written by hand because the `mysql` crate parses and rewrites the events it streams
//! (their checksums included) and sets up the dump the MySQL way; an archive needs the
//! events' exact bytes, MariaDB's GTID events and heartbeats.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::server::credentials::{Credentials, Endpoint};

const CLIENT_LONG_PASSWORD: u32 = 1;
const CLIENT_PROTOCOL_41: u32 = 0x200;
const CLIENT_TRANSACTIONS: u32 = 0x2000;
const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
const CLIENT_PLUGIN_AUTH: u32 = 0x80000;
const COM_QUERY: u8 = 3;
const COM_BINLOG_DUMP: u8 = 0x12;
const COM_REGISTER_SLAVE: u8 = 0x15;
/// The dump also sends the annotate-rows events (the statement text of row events).
const BINLOG_SEND_ANNOTATE_ROWS_EVENT: u16 = 2;
const MAX_PACKET: usize = 0xff_ffff;

trait Stream: Read + Write + Send {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}
impl Stream for TcpStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}
impl Stream for UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

pub struct Client {
    stream: Box<dyn Stream>,
    seq: u8,
    endpoint: String,
    /// Bytes read; those before `taken` were taken as packets.
    buf: Vec<u8>,
    taken: usize,
    /// When bytes last arrived.
    heard: std::time::Instant,
}

/// What the dump sends next.
pub enum Packet {
    Event(Vec<u8>),
    /// The server ended the dump (it is shutting down, say).
    End,
}

impl Client {
    /// Connects and logs in (`mysql_native_password`, or a plugin that needs nothing from
    /// the client, such as `unix_socket`).
    pub fn connect(creds: &Credentials, timeout: Duration) -> Result<Client> {
        let endpoint = creds.endpoint.to_string();
        let unreachable = |e: std::io::Error| {
            Error::Server(format!("cannot connect to the server at {endpoint}: {e}"))
        };
        let stream: Box<dyn Stream> = match &creds.endpoint {
            Endpoint::Socket(p) => Box::new(UnixStream::connect(p).map_err(unreachable)?),
            Endpoint::Tcp { host, port } => {
                let addrs = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), *port))
                    .map_err(unreachable)?;
                let mut last = None;
                let mut found = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Box::new(found.ok_or_else(|| {
                    unreachable(last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()))
                })?)
            }
        };
        stream.set_timeout(Some(timeout)).map_err(unreachable)?;
        let mut c = Client {
            stream,
            seq: 0,
            endpoint,
            buf: Vec::new(),
            taken: 0,
            heard: std::time::Instant::now(),
        };
        c.login(creds)?;
        Ok(c)
    }

    fn login(&mut self, creds: &Credentials) -> Result<()> {
        let hello = self.read()?;
        if hello.first() == Some(&0xff) {
            return Err(self.server_error(&hello));
        }
        let (scramble, plugin) =
            parse_handshake(&hello).ok_or_else(|| self.protocol("a malformed greeting"))?;
        let password = creds.password.as_deref().unwrap_or("").as_bytes();
        let caps = CLIENT_LONG_PASSWORD
            | CLIENT_PROTOCOL_41
            | CLIENT_TRANSACTIONS
            | CLIENT_SECURE_CONNECTION
            | CLIENT_PLUGIN_AUTH;
        let auth = match plugin.as_str() {
            "mysql_native_password" => native_password(password, &scramble),
            _ => Vec::new(),
        };
        let mut p = Vec::new();
        p.extend(caps.to_le_bytes());
        p.extend((MAX_PACKET as u32).to_le_bytes());
        p.push(45); // utf8mb4
        p.extend([0; 23]);
        p.extend(creds.user.as_bytes());
        p.push(0);
        p.push(auth.len() as u8);
        p.extend(&auth);
        p.extend(plugin.as_bytes());
        p.push(0);
        self.write(&p)?;
        loop {
            let reply = self.read()?;
            match reply.first() {
                Some(0x00) => return Ok(()),
                Some(0xff) => {
                    let e = self.server_error(&reply);
                    let text = e.to_string();
                    return Err(if text.contains("1045") || text.contains("1698") {
                        Error::Server(format!(
                            "access denied for user {:?} at {}: check --user and --password, MYSQL_PWD or the option files",
                            creds.user, self.endpoint
                        ))
                    } else {
                        e
                    });
                }
                Some(0xfe) => {
                    // An authentication switch: the plugin's name, then its data.
                    let rest = &reply[1..];
                    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
                    let name = String::from_utf8_lossy(&rest[..end]).to_string();
                    let data = rest.get(end + 1..).unwrap_or_default();
                    let data = data.strip_suffix(&[0]).unwrap_or(data);
                    let answer = match name.as_str() {
                        "mysql_native_password" => native_password(password, data),
                        // Only where nobody can listen: there is no TLS here.
                        "mysql_clear_password" if matches!(creds.endpoint, Endpoint::Socket(_)) => {
                            [password, &[0]].concat()
                        }
                        "mysql_clear_password" => {
                            return Err(Error::Server(format!(
                                "the server at {} asks for the password in clear text over TCP, which the \
                                 binary log archiver refuses (it has no TLS): connect over the socket, or \
                                 give its user IDENTIFIED VIA mysql_native_password",
                                self.endpoint
                            )))
                        }
                        "unix_socket" | "auth_socket" => Vec::new(),
                        other => {
                            return Err(Error::Server(format!(
                                "the server asks for the authentication plugin {other}, which the binary log \
                                 archiver does not speak: give its user IDENTIFIED VIA mysql_native_password"
                            )))
                        }
                    };
                    self.write(&answer)?;
                }
                Some(0x01) => continue,
                _ => return Err(self.protocol("an unexpected answer to the login")),
            }
        }
    }

    /// Runs a statement that returns no rows.
    pub fn exec(&mut self, sql: &str) -> Result<()> {
        self.seq = 0;
        self.write(&[&[COM_QUERY], sql.as_bytes()].concat())?;
        let reply = self.read()?;
        match reply.first() {
            Some(0x00) => Ok(()),
            Some(0xff) => Err(self.server_error(&reply)),
            _ => Err(self.protocol("rows from a statement that returns none")),
        }
    }

    /// Registers as a replica with `server_id` (`SHOW SLAVE HOSTS` lists it).
    pub fn register(&mut self, server_id: u32, host: &str) -> Result<()> {
        self.seq = 0;
        let mut p = vec![COM_REGISTER_SLAVE];
        p.extend(server_id.to_le_bytes());
        let host = &host.as_bytes()[..host.len().min(60)];
        p.push(host.len() as u8);
        p.extend(host);
        p.extend([0, 0]); // no user, no password
        p.extend(0u16.to_le_bytes());
        p.extend(0u32.to_le_bytes());
        p.extend(0u32.to_le_bytes());
        self.write(&p)?;
        let reply = self.read()?;
        match reply.first() {
            Some(0x00) => Ok(()),
            Some(0xff) => Err(self.server_error(&reply)),
            _ => Err(self.protocol("an unexpected answer to the replica registration")),
        }
    }

    /// Starts the dump at `file`:`pos`; events then come with [`Client::next`], which
    /// waits at most `poll` for one.
    pub fn dump(&mut self, server_id: u32, file: &str, pos: u32, poll: Duration) -> Result<()> {
        self.seq = 0;
        let mut p = vec![COM_BINLOG_DUMP];
        p.extend(pos.to_le_bytes());
        p.extend(BINLOG_SEND_ANNOTATE_ROWS_EVENT.to_le_bytes());
        p.extend(server_id.to_le_bytes());
        p.extend(file.as_bytes());
        self.write(&p)?;
        self.stream
            .set_timeout(Some(poll))
            .map_err(|e| self.network(e))
    }

    /// The next packet of the dump; None when none came within the read timeout.
    pub fn next(&mut self) -> Result<Option<Packet>> {
        let Some(p) = self.try_read()? else {
            return Ok(None);
        };
        match p.first() {
            Some(0x00) => Ok(Some(Packet::Event(p[1..].to_vec()))),
            Some(0xfe) if p.len() < 9 => Ok(Some(Packet::End)),
            Some(0xff) => Err(self.server_error(&p)),
            _ => Err(self.protocol("an unexpected packet in the binary log dump")),
        }
    }

    /// A whole packet (joined from its 16 MiB pieces), waiting as long as the timeout.
    /// How long since bytes last arrived.
    pub fn quiet_for(&self) -> Duration {
        self.heard.elapsed()
    }

    fn read(&mut self) -> Result<Vec<u8>> {
        self.try_read()?
            .ok_or_else(|| self.network(std::io::ErrorKind::TimedOut.into()))
    }

    /// A whole packet if one is buffered or arrives within the timeout. Bytes of a packet
    /// that is not whole yet stay buffered for the next call.
    fn try_read(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(p) = self.take_packet() {
                return Ok(Some(p));
            }
            // Packets taken leave the buffer here, once per read rather than once each.
            self.buf.drain(..self.taken);
            self.taken = 0;
            let start = self.buf.len();
            self.buf.resize(start + (1 << 20), 0);
            let n = self.stream.read(&mut self.buf[start..]);
            match n {
                Ok(0) => {
                    self.buf.truncate(start);
                    return Err(self.network(std::io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(n) => {
                    self.buf.truncate(start + n);
                    self.heard = std::time::Instant::now();
                }
                Err(e) => {
                    self.buf.truncate(start);
                    return match e.kind() {
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Ok(None),
                        std::io::ErrorKind::Interrupted => continue,
                        _ => Err(self.network(e)),
                    };
                }
            }
        }
    }

    /// Takes a whole logical packet off the buffer.
    fn take_packet(&mut self) -> Option<Vec<u8>> {
        let mut at = self.taken;
        let mut pieces = Vec::new();
        loop {
            let head = self.buf.get(at..at + 4)?;
            let len = u32::from_le_bytes([head[0], head[1], head[2], 0]) as usize;
            let seq = head[3];
            if self.buf.len() < at + 4 + len {
                return None;
            }
            pieces.push((at + 4, len));
            at += 4 + len;
            if len < MAX_PACKET {
                self.seq = seq.wrapping_add(1);
                break;
            }
        }
        let mut out = Vec::with_capacity(pieces.iter().map(|p| p.1).sum());
        for (s, l) in pieces {
            out.extend_from_slice(&self.buf[s..s + l]);
        }
        self.taken = at;
        Some(out)
    }

    fn write(&mut self, payload: &[u8]) -> Result<()> {
        let mut chunks = payload.chunks(MAX_PACKET).peekable();
        let mut buf = Vec::with_capacity(payload.len() + 8);
        loop {
            let chunk = chunks.next().unwrap_or_default();
            buf.extend(&(chunk.len() as u32).to_le_bytes()[..3]);
            buf.push(self.seq);
            self.seq = self.seq.wrapping_add(1);
            buf.extend(chunk);
            if chunk.len() < MAX_PACKET && chunks.peek().is_none() {
                break;
            }
        }
        self.stream.write_all(&buf).map_err(|e| self.network(e))
    }

    fn network(&self, e: std::io::Error) -> Error {
        let what = match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                "no data and no heartbeat in time".to_string()
            }
            std::io::ErrorKind::UnexpectedEof => "the server closed the connection".into(),
            _ => e.to_string(),
        };
        Error::Server(format!(
            "replication connection to {}: {what}",
            self.endpoint
        ))
    }

    fn protocol(&self, what: &str) -> Error {
        Error::Server(format!(
            "replication connection to {}: {what}",
            self.endpoint
        ))
    }

    fn server_error(&self, p: &[u8]) -> Error {
        let code = p.get(1..3).map_or(0, |c| u16::from_le_bytes([c[0], c[1]]));
        // 0xff, code, then '#' and a five-character SQL state, then the message.
        let text = match p.get(3) {
            Some(b'#') => p.get(9..).unwrap_or_default(),
            _ => p.get(3..).unwrap_or_default(),
        };
        Error::Server(format!(
            "the server at {} said: {} ({code})",
            self.endpoint,
            String::from_utf8_lossy(text)
        ))
    }
}

/// The greeting's scramble and authentication plugin.
fn parse_handshake(p: &[u8]) -> Option<(Vec<u8>, String)> {
    if *p.first()? != 10 {
        return None;
    }
    let mut i = 1 + p[1..].iter().position(|&b| b == 0)? + 1; // server version
    i += 4; // connection id
    let mut scramble = p.get(i..i + 8)?.to_vec();
    i += 8 + 1; // the first part, a filler
    i += 2 + 1 + 2 + 2; // capabilities (low), charset, status, capabilities (high)
    let data_len = *p.get(i)? as usize;
    i += 1 + 10;
    let more = data_len.saturating_sub(8).max(13);
    let part = p.get(i..(i + more).min(p.len()))?;
    scramble.extend(part.strip_suffix(&[0]).unwrap_or(part));
    i += more;
    let rest = p.get(i..).unwrap_or_default();
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    Some((scramble, String::from_utf8_lossy(&rest[..end]).to_string()))
}

/// `SHA1(password) XOR SHA1(scramble + SHA1(SHA1(password)))`; nothing for no password.
fn native_password(password: &[u8], scramble: &[u8]) -> Vec<u8> {
    use ring::digest::{digest, Context, SHA1_FOR_LEGACY_USE_ONLY as SHA1};
    if password.is_empty() {
        return Vec::new();
    }
    let h1 = digest(&SHA1, password);
    let h2 = digest(&SHA1, h1.as_ref());
    let mut c = Context::new(&SHA1);
    c.update(&scramble[..scramble.len().min(20)]);
    c.update(h2.as_ref());
    let h3 = c.finish();
    h1.as_ref()
        .iter()
        .zip(h3.as_ref())
        .map(|(a, b)| a ^ b)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_password_matches_the_servers_formula() {
        // The server stores SHA1(SHA1(pw)); it checks SHA1(reply XOR SHA1(scramble + stored)) == stored.
        use ring::digest::{digest, Context, SHA1_FOR_LEGACY_USE_ONLY as SHA1};
        let scramble = b"abcdefghij0123456789";
        let reply = native_password(b"secret", scramble);
        let stored = digest(&SHA1, digest(&SHA1, b"secret").as_ref());
        let mut c = Context::new(&SHA1);
        c.update(scramble);
        c.update(stored.as_ref());
        let mask = c.finish();
        let h1: Vec<u8> = reply
            .iter()
            .zip(mask.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        assert_eq!(digest(&SHA1, &h1).as_ref(), stored.as_ref());
        assert!(native_password(b"", scramble).is_empty());
    }
}
