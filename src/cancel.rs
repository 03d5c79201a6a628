//! Cooperative cancellation: SIGINT, SIGTERM and SIGHUP (a dropped ssh session) set a flag that long loops check, so that
//! a stopped backup still removes its checkpoints and releases the server's backup stage.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// A cheap, cloneable handle to "has a stop signal arrived?".
#[derive(Clone, Default)]
pub struct Cancel {
    signal: Arc<AtomicUsize>,
}

impl Cancel {
    /// A token that is never cancelled (for library users and tests).
    pub fn never() -> Cancel {
        Cancel::default()
    }

    /// Routes SIGINT, SIGTERM and SIGHUP to this token instead of killing the process. A second
    /// SIGINT or SIGTERM, while the first signal is being handled, ends the process at once.
    /// SIGHUP neither does nor counts as a first signal (a hang-up often comes twice, or
    /// before a SIGTERM), and under `nohup` (SIGHUP ignored) it stays ignored.
    pub fn on_signals() -> std::io::Result<Cancel> {
        let cancel = Cancel::default();
        let seen = Arc::new(AtomicBool::new(false));
        for sig in [libc::SIGINT, libc::SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(
                sig,
                crate::error::exit::INTERRUPTED,
                seen.clone(),
            )?;
            signal_hook::flag::register(sig, seen.clone())?;
            signal_hook::flag::register_usize(sig, cancel.signal.clone(), sig as usize)?;
        }
        if !crate::sys::is_ignored(libc::SIGHUP) {
            signal_hook::flag::register_usize(
                libc::SIGHUP,
                cancel.signal.clone(),
                libc::SIGHUP as usize,
            )?;
        }
        Ok(cancel)
    }

    /// `Err(Interrupted)` once a signal has arrived.
    pub fn check(&self) -> Result<()> {
        match self.signal.load(Ordering::Relaxed) {
            0 => Ok(()),
            s if s == libc::SIGINT as usize => Err(Error::Interrupted("SIGINT")),
            s if s == libc::SIGHUP as usize => Err(Error::Interrupted("SIGHUP")),
            _ => Err(Error::Interrupted("SIGTERM")),
        }
    }

    /// Sleeps up to `duration`, waking early (with an error) when a signal arrives.
    pub fn sleep(&self, duration: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + duration;
        loop {
            self.check()?;
            let now = std::time::Instant::now();
            if now >= deadline {
                return Ok(());
            }
            std::thread::sleep((deadline - now).min(std::time::Duration::from_millis(50)));
        }
    }
}
