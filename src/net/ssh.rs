//! A receiver started on another host over `ssh`, as the original tool started WDT's. The
//! ssh command is `ssh` unless `MYROCKS_HOTBACKUP_SSH` gives another (a port, a key, options;
//! split on spaces); the program run there is `myrocks-hotbackup` unless
//! `MYROCKS_HOTBACKUP_REMOTE` names another path. The receiver's URL comes back on ssh's
//! standard output and never appears on a command line; its log lines are shown here.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::Url;
use crate::error::{Error, Result};
use crate::{info, warn};

pub const SSH_ENV: &str = "MYROCKS_HOTBACKUP_SSH";
pub const REMOTE_ENV: &str = "MYROCKS_HOTBACKUP_REMOTE";
/// Time the remote receiver may take to print its URL (one resuming re-reads what it holds).
const START_TIMEOUT: Duration = Duration::from_secs(3600);

pub struct RemoteReceiver {
    child: Child,
    pub url: Url,
    host: String,
}

/// Quotes one word for the remote shell.
fn quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+".contains(&b))
    {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', "'\\''"))
}

impl RemoteReceiver {
    /// Runs `myrocks-hotbackup receive ARGS` on `host` and reads its URL. The URL's host is
    /// replaced by `host` (without a `user@`), the name this side reaches it by.
    pub fn start(host: &str, args: &[String]) -> Result<RemoteReceiver> {
        let ssh = std::env::var(SSH_ENV).unwrap_or_else(|_| "ssh".to_string());
        let mut words = ssh.split_whitespace();
        let program = words
            .next()
            .ok_or_else(|| Error::Usage(format!("{SSH_ENV} is empty")))?;
        let remote = std::env::var(REMOTE_ENV).unwrap_or_else(|_| "myrocks-hotbackup".into());
        let command: Vec<String> = std::iter::once(remote.as_str())
            .chain(["receive"])
            .chain(args.iter().map(String::as_str))
            .map(quote)
            .collect();
        info!("Starting the receiver on {host}: {}", command.join(" "));
        let mut child = Command::new(program)
            .args(words)
            .arg(host)
            .arg(command.join(" "))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(format!("cannot run {program}"), e))?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let shown = host.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                eprintln!("[{shown}] {line}");
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Anything more is not expected; keep the pipe drained.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            Ok(_) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().ok();
                return Err(Error::Network(format!(
                    "the receiver on {host} did not start (ssh ended with {}); see its messages above",
                    status.map_or("no status".into(), |s| s.to_string())
                )));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Network(format!(
                    "the receiver on {host} printed no URL within {} s",
                    START_TIMEOUT.as_secs()
                )));
            }
        };
        let mut url = Url::parse(&line)?;
        url.host = host.rsplit('@').next().unwrap_or(host).to_string();
        Ok(RemoteReceiver {
            child,
            url,
            host: host.to_string(),
        })
    }

    /// Waits for the receiver to end; fails if it failed.
    pub fn wait(mut self) -> Result<()> {
        let status = self
            .child
            .wait()
            .map_err(|e| Error::io("cannot wait for ssh", e))?;
        match status.success() {
            true => Ok(()),
            false => Err(Error::Network(format!(
                "the receiver on {} failed ({status}); see its messages above",
                self.host
            ))),
        }
    }
}

impl Drop for RemoteReceiver {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // The receiver hears the sender's abort, or gives up waiting; give it a moment
            // before the ssh session is cut.
            for _ in 0..50 {
                std::thread::sleep(Duration::from_millis(100));
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
            }
            warn!("the receiver on {} did not end: closing ssh", self.host);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
