//! How a running backup shows its progress: a live bar on a terminal ([`Bar`]), or lines
//! every ten seconds ([`Lines`]): in the original tool's style, or one JSON object per line
//! for monitoring. The pipeline counts the bytes it reads; the engine
//! sets the total as soon as a checkpoint tells it (it grows while the server writes).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::info;
use crate::log::human;

pub trait Progress: Sync {
    /// Bytes the backup will have read when done, as far as known now.
    fn set_total(&self, bytes: u64);
    /// `bytes` more were read.
    fn add(&self, bytes: u64);
    /// The backup ended; remove anything drawn.
    fn done(&self);
}

/// How often the line implementations report.
const EVERY: Duration = Duration::from_secs(10);

/// Counters shared by the implementations.
struct Counts {
    start: Instant,
    total: AtomicU64,
    done: AtomicU64,
    /// When and at how many bytes the last report was made.
    last: Mutex<(Instant, u64)>,
}

impl Counts {
    fn new() -> Counts {
        Counts {
            start: Instant::now(),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            last: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Adds bytes; returns (done, total, rate since the last report, ETA) when a report is due.
    fn add(&self, bytes: u64) -> Option<(u64, u64, f64, Option<u64>)> {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let mut last = self.last.try_lock().ok()?;
        let since = last.0.elapsed();
        if since < EVERY {
            return None;
        }
        let rate = (done - last.1) as f64 / since.as_secs_f64();
        *last = (Instant::now(), done);
        let total = self.total.load(Ordering::Relaxed).max(done);
        let eta = (rate > 0.0).then(|| ((total - done) as f64 / rate) as u64);
        Some((done, total, rate, eta))
    }
}

/// Lines every ten seconds: in the original tool's words
/// (`Backup Progress: Sent 1.20 GiB of 3.40 GiB (35%), Transfer Speed: ...`), or one JSON
/// object per line on stderr, for monitoring.
pub struct Lines {
    counts: Counts,
    json: bool,
}

impl Lines {
    pub fn log() -> Lines {
        Lines {
            counts: Counts::new(),
            json: false,
        }
    }

    pub fn json() -> Lines {
        Lines {
            counts: Counts::new(),
            json: true,
        }
    }
}

impl Progress for Lines {
    fn set_total(&self, bytes: u64) {
        self.counts.total.store(bytes, Ordering::Relaxed);
    }

    fn add(&self, bytes: u64) {
        let Some((done, total, rate, eta)) = self.counts.add(bytes) else {
            return;
        };
        if self.json {
            let line = serde_json::json!({
                "progress": {
                    "bytes": done,
                    "total_bytes": total,
                    "bytes_per_sec": rate as u64,
                    "eta_secs": eta,
                    "elapsed_secs": self.counts.start.elapsed().as_secs_f64(),
                }
            });
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        } else {
            info!(
                "Backup Progress: Sent {} of {} ({:.0}%), Transfer Speed: {}/s{}",
                human(done),
                human(total),
                done as f64 * 100.0 / total.max(1) as f64,
                human(rate as u64),
                eta.map_or(String::new(), |s| format!(", ETA {}", clock(s)))
            );
        }
    }

    fn done(&self) {}
}

/// A live bar on the terminal: bytes, rate, percentage and ETA. Log lines print above it.
pub struct Bar {
    bar: indicatif::ProgressBar,
}

impl Bar {
    pub fn new() -> Bar {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(0),
            indicatif::ProgressDrawTarget::stderr_with_hz(4),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {percent}% {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(250));
        crate::log::set_bar(Some(bar.clone()));
        Bar { bar }
    }
}

impl Default for Bar {
    fn default() -> Self {
        Bar::new()
    }
}

impl Progress for Bar {
    fn set_total(&self, bytes: u64) {
        self.bar.set_length(bytes.max(self.bar.position()));
    }

    fn add(&self, bytes: u64) {
        self.bar.inc(bytes);
        if self.bar.position() > self.bar.length().unwrap_or(0) {
            self.bar.set_length(self.bar.position());
        }
    }

    fn done(&self) {
        crate::log::set_bar(None);
        self.bar.finish_and_clear();
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.done();
    }
}

/// `1:02:03` or `2:03`.
fn clock(secs: u64) -> String {
    match (secs / 3600, secs / 60 % 60, secs % 60) {
        (0, m, s) => format!("{m}:{s:02}"),
        (h, m, s) => format!("{h}:{m:02}:{s:02}"),
    }
}

/// No progress at all (`--progress none`).
pub struct Quiet;

impl Progress for Quiet {
    fn set_total(&self, _bytes: u64) {}
    fn add(&self, _bytes: u64) {}
    fn done(&self) {}
}
