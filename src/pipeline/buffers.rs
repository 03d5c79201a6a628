//! Owned, pooled buffers. A pool hands out at most a fixed number of buffers, allocating
//! them on first use; a buffer goes back to its pool when dropped, wherever that happens
//! (in a reader, a compression worker, or a sink's writer thread). Memory is therefore
//! bounded by the pool sizes, whatever the size of the data.
//!
//! A buffer can also be a window on a file mapped into memory: the pages of an SST, which
//! nobody changes, read where the page cache holds them instead of being copied out. A sink
//! may then hand those pages on without copying them either (a pipe takes them by
//! reference, a directory may copy the range inside the kernel).

use std::fs::File;
use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::cancel::Cancel;
use crate::error::Result;

pub struct Pool {
    free: Receiver<Vec<u8>>,
    home: Sender<Vec<u8>>,
    allocated: AtomicUsize,
    max: usize,
    size: usize,
}

impl Pool {
    /// A pool of at most `max` buffers of `size` bytes each.
    pub fn new(max: usize, size: usize) -> Pool {
        let (home, free) = crossbeam_channel::bounded(max);
        Pool {
            free,
            home,
            allocated: AtomicUsize::new(0),
            max,
            size,
        }
    }

    /// A buffer of the pool's size, waiting for one to come back when all are in use.
    /// (A stop signal ends the wait: buffers may be held by a destination that is gone.)
    pub fn get(&self, cancel: &Cancel) -> Result<Buf> {
        let data = match self.free.try_recv() {
            Ok(data) => data,
            Err(_) if self.reserve() => vec![0; self.size],
            Err(_) => loop {
                match self
                    .free
                    .recv_timeout(std::time::Duration::from_millis(200))
                {
                    Ok(data) => break data,
                    Err(_) => cancel.check()?,
                }
            },
        };
        Ok(Buf {
            len: 0,
            data,
            home: Some(self.home.clone()),
            mapped: None,
        })
    }

    fn reserve(&self) -> bool {
        self.allocated
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }
}

/// A buffer whose first `len` bytes are its contents, or a window on a mapped file.
pub struct Buf {
    data: Vec<u8>,
    len: usize,
    home: Option<Sender<Vec<u8>>>,
    mapped: Option<Window>,
}

/// `len` bytes at `offset` of a file that nobody changes, mapped into memory.
struct Window {
    map: Arc<memmap2::Mmap>,
    file: Arc<File>,
    offset: usize,
    len: usize,
}

impl Buf {
    /// Bytes that belong to no pool (small files made in memory).
    pub fn from_vec(data: Vec<u8>) -> Buf {
        Buf {
            len: data.len(),
            data,
            home: None,
            mapped: None,
        }
    }

    /// `len` bytes at `offset` of the mapped immutable file `file`.
    pub fn mapped(map: Arc<memmap2::Mmap>, file: Arc<File>, offset: usize, len: usize) -> Buf {
        assert!(offset + len <= map.len());
        Buf {
            data: Vec::new(),
            len: 0,
            home: None,
            mapped: Some(Window {
                map,
                file,
                offset,
                len,
            }),
        }
    }

    /// The file and offset these bytes are at, when they are pages of an immutable file.
    pub fn file_range(&self) -> Option<(&File, u64)> {
        self.mapped.as_ref().map(|w| (&*w.file, w.offset as u64))
    }

    /// The whole buffer, to be filled; then [`Buf::set_len`].
    pub fn space(&mut self) -> &mut [u8] {
        assert!(self.mapped.is_none(), "a mapped file is read-only");
        &mut self.data
    }

    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.data.len());
        self.len = len;
    }
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.mapped {
            Some(w) => &w.map[w.offset..w.offset + w.len],
            None => &self.data[..self.len],
        }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            let _ = home.try_send(std::mem::take(&mut self.data));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_return_to_their_pool_and_are_reused() {
        let pool = Pool::new(2, 16);
        let never = Cancel::never();
        let a = pool.get(&never).unwrap();
        let b = pool.get(&never).unwrap();
        let ptr = a.data.as_ptr();
        drop(a);
        let c = pool.get(&never).unwrap(); // must be a's buffer: no third allocation
        assert_eq!(c.data.as_ptr(), ptr);
        assert_eq!(pool.allocated.load(Ordering::Relaxed), 2);
        drop((b, c));
    }

    #[test]
    fn a_full_pool_waits_for_a_buffer() {
        let pool = Pool::new(1, 8);
        let never = Cancel::never();
        let a = pool.get(&never).unwrap();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| pool.get(&never).unwrap().space().len());
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!waiter.is_finished());
            drop(a);
            assert_eq!(waiter.join().unwrap(), 8);
        });
    }
}
