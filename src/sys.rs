//! The few system calls the tool needs that the standard library does not offer, each
//! behind a safe function: free space, `syncfs`, the host name, the effective user, page
//! cache hints and residency, write-behind, pipe sizes, the standard descriptors, local
//! time, `renameat2`, and scrubbing a password from the process's command line. Every
//! `unsafe` block of the crate is here.

use std::ffi::{c_char, c_int, CStr};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::error::{Error, IoContext, Result};

/// Free bytes (for an unprivileged user) and total bytes of the filesystem holding `path`.
pub fn free_space(path: &Path) -> Result<(u64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Usage(format!("{} holds a NUL byte", path.display())))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io(
            format!("cannot read the free space of {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    let unit = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * unit, st.f_blocks as u64 * unit))
}

/// Flushes the whole filesystem holding `path` to disk.
pub fn syncfs(path: &Path) -> Result<()> {
    let f = File::open(path).with_path("open", path)?;
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(Error::io(
            format!("cannot sync {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// This host's name, or "" if it cannot be read.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// The effective user and group ids.
pub fn ids() -> (u32, u32) {
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// CPU seconds (user and system) this process has used so far, and its peak memory in bytes.
pub fn own_usage() -> (f64, u64) {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (
        secs(usage.ru_utime) + secs(usage.ru_stime),
        usage.ru_maxrss as u64 * 1024,
    )
}

/// Tells the kernel a file will be read from start to end (more read-ahead). Only a hint.
pub fn advise_sequential(file: &File) {
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
}

/// Drops a range of a file from the page cache (pages that are dirty stay). Only a hint.
pub fn drop_cache(file: &File, offset: u64, len: u64) {
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
}

/// Which pages of the first `len` bytes of `file` are in the page cache now, one flag per
/// page of [`page_size`] bytes; `None` when that cannot be found out (an empty file, a
/// filesystem that cannot be mapped).
pub fn resident_pages(file: &File, len: u64) -> Option<Vec<bool>> {
    if len == 0 {
        return None;
    }
    let page = page_size();
    let pages = len.div_ceil(page) as usize;
    // SAFETY: a private read-only mapping, never dereferenced: mincore only looks at it.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        if addr == libc::MAP_FAILED {
            return None;
        }
        let resident = mincore(addr, len as usize, pages);
        libc::munmap(addr, len as usize);
        resident
    }
}

/// [`resident_pages`] of a file already mapped (with [`map_immutable`]).
pub fn resident_in(map: &memmap2::Mmap) -> Option<Vec<bool>> {
    let pages = (map.len() as u64).div_ceil(page_size()) as usize;
    // SAFETY: the mapping is live for the call; mincore only looks at it.
    unsafe { mincore(map.as_ptr() as *mut libc::c_void, map.len(), pages) }
}

/// # Safety
/// `addr` and `len` describe a live mapping of `pages` pages.
unsafe fn mincore(addr: *mut libc::c_void, len: usize, pages: usize) -> Option<Vec<bool>> {
    let mut vec = vec![0u8; pages];
    let rc = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    (rc == 0).then(|| vec.iter().map(|&b| b & 1 == 1).collect())
}

pub fn page_size() -> u64 {
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    }
}

/// Starts writing a range of a file to disk, without waiting.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Waits until a range of a file is on disk (started with [`start_writeback`]).
pub fn wait_writeback(file: &File, offset: u64, len: u64) {
    let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, wait) };
}

/// Maps the first `len` bytes of a file nobody will change (an SST: RocksDB writes each
/// once, and the backup holds a hard link to it, so it is never truncated under us).
pub fn map_immutable(file: &File, len: u64) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the mapping is read-only, and the file is immutable while mapped: a change
    // would show in the bytes read (and their checksum), a truncation would raise SIGBUS.
    let map = unsafe { memmap2::MmapOptions::new().len(len as usize).map(file)? };
    let _ = map.advise(memmap2::Advice::Sequential);
    Ok(map)
}

/// A read error on a file mapped into memory (a bad sector under an SST) arrives as SIGBUS,
/// not as an error code: say so and exit, rather than die without a word. The run's
/// checkpoint is left behind, like after `kill -9`, and the next run removes it.
pub fn explain_sigbus() -> std::io::Result<()> {
    const MSG: &[u8] = b"myrocks-hotbackup: ERROR a file mapped into memory could not be read (SIGBUS: an I/O \
error, or a file cut short under the backup); the backup is incomplete, and its checkpoint is removed by \
the next run\n";
    // SAFETY: the handler calls only write(2) and _exit(2), both async-signal-safe.
    unsafe {
        signal_hook::low_level::register(libc::SIGBUS, || {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(1);
        })?;
    }
    Ok(())
}

/// Hands pages to a pipe by reference (`vmsplice`), without copying them. The pages must
/// not change until the reader of the pipe has read them: pages of an immutable file.
pub fn vmsplice_all(pipe: &File, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        // SAFETY: the iovec describes live memory for the length of the call.
        let n = unsafe { libc::vmsplice(pipe.as_raw_fd(), &iov, 1, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

/// True when `file` is a pipe.
pub fn is_pipe(file: &File) -> bool {
    use std::os::unix::fs::FileTypeExt;
    file.metadata().is_ok_and(|m| m.file_type().is_fifo())
}

/// Copies `len` bytes from `src` at `src_offset` to `dst` at `dst_offset` inside the kernel
/// (`copy_file_range`: a reflink where the filesystem shares blocks). `Ok(false)` when the
/// kernel cannot do it for these files (the caller then writes the bytes itself).
pub fn copy_range(
    src: &File,
    src_offset: u64,
    dst: &File,
    dst_offset: u64,
    len: u64,
) -> std::io::Result<bool> {
    let (mut off_in, mut off_out) = (src_offset as i64, dst_offset as i64);
    let mut left = len as usize;
    while left > 0 {
        // SAFETY: plain descriptors and offsets owned by this call.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                left,
                0,
            )
        };
        match n {
            n if n > 0 => left -= n as usize,
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = std::io::Error::last_os_error();
                let unsupported = matches!(
                    e.raw_os_error(),
                    Some(
                        libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EBADF
                    )
                );
                return match (unsupported, left == len as usize) {
                    (true, true) => Ok(false),
                    _ => Err(e),
                };
            }
        }
    }
    Ok(true)
}

/// Raises the kernel buffer of a pipe to `size` bytes. Fails harmlessly on anything but a
/// pipe, or past the system's pipe-max-size.
pub fn set_pipe_size(file: &File, size: c_int) {
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
}

/// Local wall-clock time broken down: (year, month, day, hour, minute, second).
pub fn local_time(secs: i64) -> (i32, i32, i32, i32, i32, i32) {
    let t = secs as libc::time_t;
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&t, &mut tm) };
    (
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
    )
}

/// Seconds since the epoch of a local wall-clock time; None when there is no such time.
pub fn from_local_time(y: i32, mo: i32, d: i32, h: i32, mi: i32, s: i32) -> Option<i64> {
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = s;
    tm.tm_isdst = -1;
    let secs = unsafe { libc::mktime(&mut tm) };
    // mktime moves a time that does not exist (10:75, or in a clock change's gap): refused.
    (secs != -1 && local_time(secs) == (y, mo, d, h, mi, s)).then_some(secs)
}

/// `rename` that fails instead of replacing an existing target.
pub fn rename_noreplace(src: &Path, dst: &Path) -> std::io::Result<()> {
    let c =
        |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (from, to) = (c(src)?, c(dst)?);
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// True when `signal` is ignored (as `nohup` leaves SIGHUP).
pub fn is_ignored(signal: libc::c_int) -> bool {
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// The process's own argument vector, as the C runtime passed it (glibc calls the functions
/// of `.init_array` with argc and argv, as it does for the standard library's own copy;
/// other C libraries do not, and there nothing is captured or scrubbed).
static ARGC: AtomicUsize = AtomicUsize::new(0);
static ARGV: AtomicPtr<*mut c_char> = AtomicPtr::new(std::ptr::null_mut());

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[used]
#[unsafe(link_section = ".init_array")]
static CAPTURE_ARGV: extern "C" fn(c_int, *mut *mut c_char, *mut *mut c_char) = capture_argv;

#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
extern "C" fn capture_argv(argc: c_int, argv: *mut *mut c_char, _env: *mut *mut c_char) {
    ARGC.store(argc.max(0) as usize, Ordering::Relaxed);
    ARGV.store(argv, Ordering::Relaxed);
}

/// Overwrites, in the memory `ps` and `/proc/PID/cmdline` show, every password given on the
/// command line (`--password=PW`, `--password PW`, `-pPW`, `-p PW`) with `x`, as the MySQL
/// client tools do. Other users could read it there; after this they read `xxxx`.
///
/// # Safety
/// Call it while the process has one thread, after the arguments were parsed: it writes
/// to the memory that `std::env::args` reads.
pub unsafe fn scrub_password_args() {
    let argv = ARGV.load(Ordering::Relaxed);
    if argv.is_null() {
        return;
    }
    let argc = ARGC.load(Ordering::Relaxed);
    let mut next_is_password = false;
    for i in 1..argc {
        // SAFETY: argv holds argc valid, NUL-terminated, writable strings for the life of
        // the process; only their bytes are changed, never their length.
        let arg = unsafe { *argv.add(i) };
        if arg.is_null() {
            break;
        }
        let bytes = unsafe { CStr::from_ptr(arg) }.to_bytes();
        if bytes == b"--" {
            break;
        }
        let secret_from = if std::mem::take(&mut next_is_password) && !bytes.starts_with(b"-") {
            Some(0)
        } else if let Some(value) = bytes.strip_prefix(b"--password=") {
            Some(bytes.len() - value.len())
        } else if bytes == b"--password" || bytes == b"-p" {
            next_is_password = true;
            None
        } else if bytes.starts_with(b"-p") && !bytes.starts_with(b"--") {
            Some(2)
        } else {
            // A receiver's URL (`--to mhb://...`): its token is the secret.
            bytes
                .windows(6)
                .position(|w| w == b"token=")
                .map(|at| at + 6)
        };
        if let Some(from) = secret_from {
            for k in from..bytes.len() {
                unsafe { *arg.add(k) = b'x' as c_char };
            }
        }
    }
}

/// Makes unacknowledged data on a TCP connection fail it after `ms` milliseconds, instead of
/// the kernel's minutes of retransmissions on a dead path.
pub fn set_tcp_user_timeout(sock: &std::net::TcpStream, ms: u32) {
    let value = ms as c_int;
    // SAFETY: a valid socket, and a pointer to an int of the size given.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&value as *const c_int).cast(),
            std::mem::size_of::<c_int>() as libc::socklen_t,
        );
    }
}

/// Waits up to `timeout` for `fd` to be readable (or closed); true when it is.
pub fn wait_readable(fd: &impl AsRawFd, timeout: std::time::Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as c_int;
    loop {
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        match n {
            0 => return Ok(false),
            n if n > 0 => return Ok(true),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Takes an exclusive advisory lock on an open file or directory without waiting; false
/// when another process holds it. Released when the file is closed.
pub fn try_lock_exclusive(file: &File) -> std::io::Result<bool> {
    // SAFETY: a valid descriptor.
    match unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } {
        0 => Ok(true),
        _ => {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                true => Ok(false),
                false => Err(e),
            }
        }
    }
}
