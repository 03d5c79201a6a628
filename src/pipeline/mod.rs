//! The path from files on disk to a [`Sink`]: the engine plans batches of [`Item`]s (a
//! file, its kind and its name in the backup); reader threads take them in turn, read,
//! throttle and checksum each byte once ([`read`]); compression workers, when asked for,
//! compress chunks on every core ([`compress`]); the sink stores the results. Channels are
//! bounded and buffers come from fixed pools ([`buffers`]), so memory depends on the
//! configuration, never on the data. Progress goes to a [`progress::Progress`].

mod buffers;
pub mod compress;
pub mod progress;
mod read;
mod throttle;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

pub use buffers::Buf;
use buffers::Pool;
pub use compress::Compression;
use progress::Progress;
use throttle::Throttle;

use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::format::layout::BEGIN_NAME;
use crate::format::manifest::{self, Begin, FileRecord, Kind, Manifest};
use crate::format::CHUNK_SIZE;
use crate::sink::Sink;

/// One file to store.
pub struct Item {
    /// Its path in the backup.
    pub name: String,
    pub kind: Kind,
    pub source: Source,
}

pub enum Source {
    /// A file on disk; `len` sends only its first bytes (a log that goes on growing);
    /// `unlink` removes it once the sink holds it (a checkpoint's hard link).
    File {
        path: PathBuf,
        len: Option<u64>,
        unlink: bool,
    },
    /// Bytes made in memory (the backup's own metadata).
    Bytes(Vec<u8>),
}

impl Item {
    pub fn file(name: impl Into<String>, kind: Kind, path: impl Into<PathBuf>) -> Item {
        Item {
            name: name.into(),
            kind,
            source: Source::File {
                path: path.into(),
                len: None,
                unlink: false,
            },
        }
    }

    pub fn bytes(name: impl Into<String>, kind: Kind, bytes: Vec<u8>) -> Item {
        Item {
            name: name.into(),
            kind,
            source: Source::Bytes(bytes),
        }
    }
}

/// How the pipeline runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Files read at once (fewer when the sink takes fewer).
    pub parallel: usize,
    pub compression: Option<Compression>,
    /// Compression workers.
    pub compress_threads: usize,
    /// The cap on the read rate of all readers together.
    pub bytes_per_sec: Option<u64>,
}

impl Options {
    /// One reader, no compression, no cap.
    pub fn serial() -> Options {
        Options {
            parallel: 1,
            compression: None,
            compress_threads: 1,
            bytes_per_sec: None,
        }
    }
}

/// Chunks a sink may hold of a file it has not yet taken (see [`sink::stream`](crate::sink::stream)).
pub const QUEUED_CHUNKS: usize = 4;

/// One call of [`Pipeline::send_checked`]: the items left, and how the readers stop.
struct Batch<'a> {
    queue: Mutex<VecDeque<Item>>,
    deadline: Option<Instant>,
    /// Some item was taken (a deadline stops the batch only after that).
    taken: AtomicBool,
    check: &'a (dyn Fn() -> Result<()> + Sync),
    failed: AtomicBool,
    first_error: Mutex<Option<Error>>,
}

impl Batch<'_> {
    /// Stops the batch; the first error is the one reported (a sink's "closed" follows the
    /// error that closed it, and gives way to it).
    fn fail(&self, e: Error) {
        self.failed.store(true, Ordering::Relaxed);
        let mut first = lock(&self.first_error);
        if matches!(*first, None | Some(Error::Closed)) {
            *first = Some(e);
        }
    }
}

/// What the readers share.
struct Ctx<'a> {
    sink: &'a dyn Sink,
    pool: &'a Pool,
    throttle: Option<Throttle>,
    compress: Option<CompressCtx<'a>>,
    progress: &'a dyn Progress,
    cancel: Cancel,
}

struct CompressCtx<'a> {
    jobs: crossbeam_channel::Sender<compress::Job>,
    pool: &'a Pool,
    /// Chunks of one file in the workers at once.
    depth: usize,
    /// SSTs are compressed too.
    ssts: bool,
}

pub struct Pipeline<'a> {
    sink: &'a dyn Sink,
    options: Options,
    progress: &'a dyn Progress,
    cancel: Cancel,
    pool: Pool,
    out_pool: Pool,
    throttle_rate: Option<u64>,
    records: Mutex<Vec<FileRecord>>,
}

impl<'a> Pipeline<'a> {
    pub fn new(
        sink: &'a dyn Sink,
        options: Options,
        progress: &'a dyn Progress,
        cancel: Cancel,
    ) -> Pipeline<'a> {
        let readers = options.parallel.max(1);
        let depth = compress_depth(&options);
        // A reader holds at most `depth` chunks in the workers, `QUEUED_CHUNKS` in the sink
        // and one in its hands: with these sizes no pool ever runs dry for a reader that
        // must make progress, so the stages cannot block each other in a circle.
        let (input, output) = match options.compression {
            Some(_) => (
                readers * (depth.max(QUEUED_CHUNKS) + 1) + 1,
                readers * (depth + QUEUED_CHUNKS + 1) + 1,
            ),
            None => (readers * (QUEUED_CHUNKS + 1) + 1, 0),
        };
        Pipeline {
            sink,
            progress,
            cancel,
            pool: Pool::new(input, CHUNK_SIZE),
            out_pool: Pool::new(output.max(1), compress::bound(CHUNK_SIZE)),
            throttle_rate: options.bytes_per_sec,
            options,
            records: Mutex::new(Vec::new()),
        }
    }

    /// Starts the backup: its marker file goes first.
    pub fn begin(&self) -> Result<()> {
        self.send(
            vec![Item::bytes(
                BEGIN_NAME,
                Kind::Metadata,
                Begin::now(self.options.compression.map(|c| c.label())),
            )],
            None,
        )
        .map(drop)
    }

    /// Stores `items`, several at a time. Items not started by `deadline` are returned.
    pub fn send(&self, items: Vec<Item>, deadline: Option<Instant>) -> Result<Vec<Item>> {
        self.send_checked(items, deadline, &|| Ok(()))
    }

    /// Like [`Pipeline::send`], running `check` after every file stored (the engine's free
    /// space guard): its error stops the batch.
    pub fn send_checked(
        &self,
        items: Vec<Item>,
        deadline: Option<Instant>,
        check: &(dyn Fn() -> Result<()> + Sync),
    ) -> Result<Vec<Item>> {
        let readers = self
            .options
            .parallel
            .min(self.sink.max_in_flight())
            .min(items.len())
            .max(1);
        let batch = Batch {
            queue: Mutex::new(items.into_iter().collect()),
            deadline,
            taken: AtomicBool::new(false),
            check,
            failed: AtomicBool::new(false),
            first_error: Mutex::new(None),
        };
        let level = self.options.compression.map(|c| c.level);
        std::thread::scope(|workers| {
            let (jobs, job_queue) = crossbeam_channel::bounded(self.options.compress_threads * 2);
            let mut handles = Vec::new();
            if let Some(level) = level {
                for _ in 0..self.options.compress_threads.max(1) {
                    let job_queue = job_queue.clone();
                    handles.push(workers.spawn(move || compress::worker(job_queue, level)));
                }
            }
            drop(job_queue);
            let ctx = Ctx {
                sink: self.sink,
                pool: &self.pool,
                throttle: self.throttle_rate.map(Throttle::new),
                compress: self.options.compression.map(|c| CompressCtx {
                    jobs,
                    pool: &self.out_pool,
                    depth: compress_depth(&self.options),
                    ssts: c.ssts,
                }),
                progress: self.progress,
                cancel: self.cancel.clone(),
            };
            std::thread::scope(|s| {
                let readers: Vec<_> = (0..readers)
                    .map(|_| s.spawn(|| self.reader(&ctx, &batch)))
                    .collect();
                for r in readers {
                    if r.join().is_err() {
                        batch.fail(Error::Refused("a reader thread panicked".into()));
                    }
                }
            });
            // Dropping the context closes the job queue: the workers end.
            drop(ctx);
            for h in handles {
                if h.join().is_err() {
                    batch.fail(Error::Refused("a compression worker panicked".into()));
                }
            }
        });
        match batch
            .first_error
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
        {
            Some(e) => Err(e),
            None => Ok(batch
                .queue
                .into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .into()),
        }
    }

    /// One reader thread: takes items until none are left, the deadline passed, or a
    /// reader failed.
    fn reader(&self, ctx: &Ctx, batch: &Batch) {
        loop {
            // A batch with a deadline still stores at least one file: a round whose
            // checkpoint took longer than the interval makes progress.
            let late = batch.deadline.is_some_and(|d| Instant::now() >= d)
                && batch.taken.load(Ordering::Relaxed);
            if batch.failed.load(Ordering::Relaxed) || late {
                return;
            }
            let Some(item) = lock(&batch.queue).pop_front() else {
                return;
            };
            batch.taken.store(true, Ordering::Relaxed);
            let stored = read::store(item, ctx).and_then(|record| {
                lock(&self.records).push(record);
                (batch.check)()
            });
            if let Err(e) = stored {
                batch.fail(e);
                return;
            }
        }
    }

    /// The records of every file stored so far.
    pub fn records(&self) -> Vec<FileRecord> {
        lock(&self.records).clone()
    }

    /// Completes the backup: the manifest, with every file stored, goes last.
    pub fn commit<B: Serialize>(self, backup: B) -> Result<Manifest<B>> {
        let mut files = self.records.into_inner().unwrap_or_else(|e| e.into_inner());
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let manifest = Manifest {
            format: manifest::FORMAT_VERSION,
            tool: manifest::tool_version(),
            compression: self.options.compression.map(|c| c.label()),
            backup,
            files,
        };
        self.sink.commit(&manifest.to_json())?;
        Ok(manifest)
    }
}

/// Chunks of one file in the compression workers at once: enough for all readers together
/// to keep about two jobs per worker queued, so memory grows with the workers, not with
/// their square.
fn compress_depth(options: &Options) -> usize {
    (2 * options.compress_threads.max(1)).div_ceil(options.parallel.max(1))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::FileMeta;
    use crate::sink::{Chunk, SinkFile};

    /// A sink that keeps files in memory and already holds those named in `held`.
    #[derive(Default)]
    struct Memory {
        held: Vec<String>,
        files: Mutex<Vec<(String, Vec<u8>)>>,
    }

    struct MemoryFile<'a>(&'a Memory, String, Vec<u8>);

    impl Sink for Memory {
        fn max_in_flight(&self) -> usize {
            usize::MAX
        }
        fn lookup(&self, meta: &FileMeta, _size: u64) -> Result<Option<FileRecord>> {
            Ok(self.held.contains(&meta.path).then(|| FileRecord {
                path: meta.path.clone(),
                size: meta.size.unwrap_or_default(),
                crc32: 0x1234,
                kind: Kind::Sst,
                original: None,
            }))
        }
        fn open(&self, meta: &FileMeta) -> Result<Box<dyn SinkFile + '_>> {
            Ok(Box::new(MemoryFile(self, meta.path.clone(), Vec::new())))
        }
        fn commit(&self, _manifest: &[u8]) -> Result<()> {
            Ok(())
        }
        fn abort(&self) -> Option<Error> {
            None
        }
    }

    impl SinkFile for MemoryFile<'_> {
        fn write(&mut self, chunk: Chunk) -> Result<()> {
            assert_eq!(crc32fast::hash(&chunk.data), chunk.crc32);
            self.2.extend_from_slice(&chunk.data);
            Ok(())
        }
        fn finish(self: Box<Self>, _record: &FileRecord) -> Result<()> {
            lock(&self.0.files).push((self.1, self.2));
            Ok(())
        }
    }

    fn sst(dir: &std::path::Path, name: &str, data: &[u8]) -> Item {
        std::fs::write(dir.join(name), data).unwrap();
        Item {
            name: name.into(),
            kind: Kind::Sst,
            source: Source::File {
                path: dir.join(name),
                len: None,
                unlink: true,
            },
        }
    }

    #[test]
    fn files_the_sink_holds_are_not_read_and_links_go_once_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let sink = Memory {
            held: vec!["2.sst".into()],
            ..Memory::default()
        };
        let options = Options {
            parallel: 3,
            ..Options::serial()
        };
        let pipeline = Pipeline::new(&sink, options, &progress::Quiet, Cancel::never());
        let big: Vec<u8> = (0..3 * CHUNK_SIZE + 5).map(|i| (i % 251) as u8).collect();
        let items = vec![
            sst(tmp.path(), "1.sst", &big),
            sst(tmp.path(), "2.sst", b"held"),
            sst(tmp.path(), "3.sst", b""),
        ];
        assert!(pipeline.send(items, None).unwrap().is_empty());
        let mut stored = lock(&sink.files).clone();
        stored.sort();
        assert_eq!(
            stored,
            vec![("1.sst".into(), big.clone()), ("3.sst".into(), vec![])]
        );
        let records = pipeline.records();
        let held = records.iter().find(|r| r.path == "2.sst").unwrap();
        assert_eq!(held.crc32, 0x1234, "the sink's own record");
        let first = records.iter().find(|r| r.path == "1.sst").unwrap();
        assert_eq!(
            (first.size, first.crc32),
            (big.len() as u64, crc32fast::hash(&big))
        );
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "every link removed"
        );
    }

    #[test]
    fn a_passed_deadline_leaves_items_unsent_after_one() {
        let tmp = tempfile::tempdir().unwrap();
        let sink = Memory::default();
        let pipeline = Pipeline::new(&sink, Options::serial(), &progress::Quiet, Cancel::never());
        let items = vec![
            sst(tmp.path(), "1.sst", b"a"),
            sst(tmp.path(), "2.sst", b"b"),
        ];
        let left = pipeline.send(items, Some(Instant::now())).unwrap();
        assert_eq!(left.len(), 1, "one file, then the deadline stops the batch");
        assert_eq!(lock(&sink.files).len(), 1);
        assert!(
            tmp.path().join("2.sst").exists(),
            "links of unsent files stay"
        );
    }
}
