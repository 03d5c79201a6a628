//! Backups over the network: a receiver ([`receive`]) that listens on one port and prints a
//! URL, and the sending side ([`crate::sink::net`]) that spreads a backup's blocks over
//! several TLS connections to it. [`link`] frames one connection, [`proto`] names its
//! messages, [`tls`] pins the keys on both ends, [`ssh`] starts a receiver on another host.
//!
//! The URL is `mhb://HOST:PORT/SESSION?key=SHA256&token=SECRET&streams=N`: where to
//! connect, the fingerprint of the receiver's one-time key, and the one-time token that
//! lets a sender in. It is a secret: it is printed once, on the receiver's standard output,
//! and read by a sender from a file or its standard input, never from its command line.

pub mod link;
pub mod proto;
pub mod receive;
pub mod ssh;
pub mod tls;

use std::net::{SocketAddr, ToSocketAddrs};

use crate::error::{Error, Result};

const SCHEME: &str = "mhb://";

#[derive(Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    pub session: String,
    pub fingerprint: String,
    pub token: String,
    /// Connections the receiver expects.
    pub streams: usize,
}

/// Never the token.
impl std::fmt::Debug for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Url")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Url {
    pub fn parse(text: &str) -> Result<Url> {
        let bad = |why: &str| {
            Error::Usage(format!(
                "not a receiver URL ({why}): expected {SCHEME}HOST:PORT/SESSION?key=...&token=..."
            ))
        };
        let rest = text
            .trim()
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("scheme"))?;
        let (authority, rest) = rest.split_once('/').ok_or_else(|| bad("no session"))?;
        let (host, port) = authority.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| bad("port"))?;
        let (session, query) = rest.split_once('?').ok_or_else(|| bad("no key"))?;
        let mut url = Url {
            host: host.to_string(),
            port,
            session: session.to_string(),
            fingerprint: String::new(),
            token: String::new(),
            streams: 0,
        };
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("key", v)) => url.fingerprint = v.to_ascii_lowercase(),
                Some(("token", v)) => url.token = v.to_string(),
                Some(("streams", v)) => url.streams = v.parse().map_err(|_| bad("streams"))?,
                _ => {}
            }
        }
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if host.is_empty()
            || !hex(&url.fingerprint, 64)
            || url.token.len() < 32
            || url.session.is_empty()
        {
            return Err(bad("host, key, session or token missing"));
        }
        Ok(url)
    }

    /// The URL, secret included: for the receiver's one line of output only.
    pub fn reveal(&self) -> String {
        let host = match self.host.contains(':') {
            true => format!("[{}]", self.host),
            false => self.host.clone(),
        };
        format!(
            "{SCHEME}{host}:{}/{}?key={}&token={}&streams={}",
            self.port, self.session, self.fingerprint, self.token, self.streams
        )
    }

    /// The receiver's address.
    pub fn addr(&self) -> Result<SocketAddr> {
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| Error::Network(format!("cannot resolve {}: {e}", self.host)))?
            .collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| Error::Network(format!("{} has no address", self.host)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_round_trips_and_its_debug_form_hides_the_token() {
        let url = Url {
            host: "db-2.example".into(),
            port: 40001,
            session: "0a1b".into(),
            fingerprint: "ab".repeat(32),
            token: "5e".repeat(24),
            streams: 8,
        };
        assert_eq!(Url::parse(&url.reveal()).unwrap(), url);
        assert!(!format!("{url:?}").contains(&url.token));
        let v6 = Url {
            host: "fd00::2".into(),
            ..url.clone()
        };
        assert_eq!(Url::parse(&v6.reveal()).unwrap(), v6);
        for bad in [
            "http://x:1/s?key=aa&token=bb",
            &url.reveal().replace("key=", "kex="),
            &url.reveal().replace(":40001", ""),
            &url.reveal().replace(&url.token, "short"),
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }
}
