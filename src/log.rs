//! Progress and diagnostics on stderr, in the original tool's style
//! (`2026-11-25 05:07:47.123 INFO message`, local time). Stdout carries only archives.

use std::fmt;
use std::io::Write;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Local wall-clock time with milliseconds.
pub fn timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let (y, mo, d, h, mi, s) = crate::sys::local_time(now.as_secs() as i64);
    format!(
        "{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{:03}",
        now.subsec_millis()
    )
}

/// The progress bar on the terminal, if one is drawn: log lines go above it.
static BAR: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// Routes log lines above `bar` (or, with `None`, straight to stderr again).
pub fn set_bar(bar: Option<indicatif::ProgressBar>) {
    *BAR.lock().unwrap_or_else(|e| e.into_inner()) = bar;
}

/// Writes one line to stderr. A closed or full stderr loses the line, never the run: the
/// clean-up that follows an error must not turn into a panic.
pub fn emit(level: &str, args: fmt::Arguments) {
    let line = format!("{} {level} {args}", timestamp());
    match &*BAR.lock().unwrap_or_else(|e| e.into_inner()) {
        Some(bar) => bar.suspend(|| {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }),
        None => {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
    }
}

/// `1.23 GiB` and the like.
pub fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", units[unit])
}

#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::emit("INFO", format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::emit("WARNING", format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::emit("ERROR", format_args!($($arg)*)) };
}

/// `2026-11-25 05:07:47` (local time) for seconds since the epoch.
pub fn local_datetime(secs: i64) -> String {
    let (y, mo, d, h, mi, s) = crate::sys::local_time(secs);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}
