//! `--avg-mbytes-per-sec`: one pace for all readers together. Each read reserves the next
//! slot on a shared timeline and waits for it. Time left unused (the destination stalled)
//! is saved up for at most [`CATCH_UP`], so the rate stays on the cap over any window of
//! seconds: over ten seconds it exceeds it by at most 4%, and never bursts for longer.
//! Reads are small (1/20 of a second's worth), so the pace is smooth.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::error::Result;
use crate::format::CHUNK_SIZE;

/// How much unused time may be caught up.
const CATCH_UP: Duration = Duration::from_millis(400);

pub struct Throttle {
    bytes_per_sec: f64,
    next: Mutex<Option<Instant>>,
}

impl Throttle {
    pub fn new(bytes_per_sec: u64) -> Throttle {
        Throttle {
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            next: Mutex::new(None),
        }
    }

    /// How many bytes to read at a time under this cap.
    pub fn piece(&self) -> usize {
        ((self.bytes_per_sec / 20.0) as usize).clamp(4096, CHUNK_SIZE)
    }

    /// Waits until `bytes` may be read.
    pub fn take(&self, bytes: usize, cancel: &Cancel) -> Result<()> {
        let start = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = next.map_or(now, |n| n.max(now.checked_sub(CATCH_UP).unwrap_or(now)));
            *next = Some(start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec));
            start
        };
        cancel.sleep(start.saturating_duration_since(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_caught_up_for_at_most_four_tenths_of_a_second() {
        let throttle = Throttle::new(10 << 20); // 10 MiB/s, pieces of 512 KiB (0.05 s)
        let piece = throttle.piece();
        throttle.take(piece, &Cancel::never()).unwrap();
        std::thread::sleep(Duration::from_secs(1)); // the destination stalled
        let start = Instant::now();
        for _ in 0..20 {
            throttle.take(piece, &Cancel::never()).unwrap();
        }
        // 20 pieces are 1 s of reading: 0.4 s of it was caught up, the rest paced.
        let took = start.elapsed().as_secs_f64();
        assert!((0.5..0.75).contains(&took), "{took} s");
    }

    #[test]
    fn readers_together_keep_to_the_rate() {
        let throttle = Throttle::new(4 << 20); // 4 MiB/s, pieces of 200 KiB
        let piece = throttle.piece();
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..10 {
                        throttle.take(piece, &Cancel::never()).unwrap();
                    }
                });
            }
        });
        // 30 pieces: the first goes at once, the last waits for 29 slots.
        let expected = 29.0 * piece as f64 / (4 << 20) as f64;
        let took = start.elapsed().as_secs_f64();
        assert!(
            took >= expected * 0.98 && took < expected + 0.5,
            "{took} s, expected {expected}"
        );
    }
}
