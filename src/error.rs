//! The one error type of the crate, and the process exit code each kind maps to.

use std::io;
use std::path::Path;

/// Exit codes, documented in the README.
pub mod exit {
    /// The command did what was asked.
    pub const OK: i32 = 0;
    /// A runtime failure: server, disk, network, a file that changed underneath us.
    pub const FAILURE: i32 = 1;
    /// The command line or its option files are wrong; nothing was done.
    pub const USAGE: i32 = 2;
    /// An archive or backup is corrupt, truncated or unsafe to extract.
    pub const CORRUPT: i32 = 3;
    /// Stopped by SIGINT or SIGTERM; everything temporary was cleaned up.
    pub const INTERRUPTED: i32 = 130;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad flags or option files, detected before any work started.
    #[error("{0}")]
    Usage(String),
    /// An I/O error, with what we were doing when it happened.
    #[error("{context}: {err}")]
    Io { context: String, err: io::Error },
    /// The input stream or backup is damaged or hostile.
    #[error("{0}")]
    Corrupt(String),
    /// A request we refuse to carry out because it would lose or endanger data.
    #[error("{0}")]
    Refused(String),
    /// The database server said no, or is not in a state we can back up.
    #[error("{0}")]
    Server(String),
    /// A transfer over the network failed: the peer refused, vanished or sent bad data.
    #[error("{0}")]
    Network(String),
    /// The backup repository (an object store or its directory) failed or is unreachable.
    #[error("{0}")]
    Store(String),
    /// A destination that stopped taking files because of an earlier error (reported first).
    #[error("the backup's destination was closed after an earlier error")]
    Closed,
    /// A signal asked us to stop.
    #[error("interrupted by {0}; temporary files were removed")]
    Interrupted(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => exit::USAGE,
            Error::Corrupt(_) => exit::CORRUPT,
            Error::Interrupted(_) => exit::INTERRUPTED,
            Error::Io { .. }
            | Error::Refused(_)
            | Error::Server(_)
            | Error::Network(_)
            | Error::Store(_)
            | Error::Closed => exit::FAILURE,
        }
    }

    pub fn io(context: impl Into<String>, err: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            err,
        }
    }

    /// True when the error is the reader of our output going away (a closed pipe).
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Error::Io { err, .. } if err.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// Attaches "what we were doing" to an `io::Result`.
pub trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
    fn with_path(self, verb: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|err| Error::io(what(), err))
    }

    fn with_path(self, verb: &str, path: &Path) -> Result<T> {
        self.map_err(|err| Error::io(format!("cannot {verb} {}", path.display()), err))
    }
}
