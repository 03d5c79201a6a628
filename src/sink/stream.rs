//! A tar or xbstream stream as a sink. One writer thread owns the encoder and the output;
//! files are written whole, one after another, in the order readers opened them. A reader
//! whose file is not yet being written reads ahead into a small bounded queue and then
//! waits, so several files are read at once while the stream stays strictly sequential.
//! A file is acknowledged once all its bytes were handed to the output.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::{Chunk, Sink, SinkFile};
use crate::error::{Error, Result};
use crate::format::layout::MANIFEST_NAME;
use crate::format::manifest::FileRecord;
use crate::format::{Encoder, FileMeta};
use crate::pipeline::{Buf, QUEUED_CHUNKS};

enum Piece {
    Data(Chunk),
    End,
}

/// A file the writer will take in its turn.
struct Queued {
    meta: FileMeta,
    pieces: Receiver<Piece>,
    written: Sender<()>,
}

pub struct StreamSink {
    /// Files in the order they will appear in the stream; `None` once committed or aborted.
    order: Mutex<Option<Sender<Queued>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Why the writer stopped, if it failed; taken by the first reader to notice.
    failure: Arc<Mutex<Option<Error>>>,
    /// Files read ahead while another is written.
    ahead: usize,
}

impl StreamSink {
    /// Starts the writer thread. `ahead` files may be read while the current one is written.
    pub fn new(encoder: Box<dyn Encoder>, ahead: usize) -> StreamSink {
        let (order, files) = crossbeam_channel::unbounded::<Queued>();
        let failure = Arc::new(Mutex::new(None));
        let failed = failure.clone();
        let writer = std::thread::spawn(move || {
            if let Err(e) = write_all(encoder, files) {
                *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
        });
        StreamSink {
            order: Mutex::new(Some(order)),
            writer: Mutex::new(Some(writer)),
            failure,
            ahead: ahead.max(1),
        }
    }

    fn failure(&self) -> Error {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or(Error::Closed)
    }

    /// Closes the queue and waits for the writer; its failure, if any.
    fn close(&self) -> Option<Error> {
        self.order.lock().unwrap_or_else(|e| e.into_inner()).take();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = writer {
            if w.join().is_err() {
                return Some(Error::Refused("the stream writer panicked".into()));
            }
        }
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// The writer thread: every queued file in turn, then the trailer. A file whose reader
/// gave up half-way ends the stream: tar and xbstream cannot take a file back.
fn write_all(mut encoder: Box<dyn Encoder>, files: Receiver<Queued>) -> Result<()> {
    let mut last = None;
    for file in files {
        encoder.begin_file(&file.meta)?;
        loop {
            match file.pieces.recv() {
                Ok(Piece::Data(chunk)) => {
                    let pages = chunk.data.file_range().is_some();
                    encoder.write_chunk(&chunk.data, chunk.crc32, pages)?
                }
                Ok(Piece::End) => break,
                // Its reader failed and reports why; the stream ends here, without a trailer.
                Err(_) => return Ok(()),
            }
        }
        encoder.end_file()?;
        let _ = file.written.send(());
        last = Some(file.meta.path);
    }
    // The queue was closed: by a commit (the manifest came last) or an abort (no trailer,
    // so that a reader of the stream sees it end early).
    if last.as_deref() == Some(MANIFEST_NAME) {
        encoder.finish()?;
    }
    Ok(())
}

impl Sink for StreamSink {
    fn max_in_flight(&self) -> usize {
        self.ahead
    }

    fn open(&self, meta: &FileMeta) -> Result<Box<dyn SinkFile + '_>> {
        let (pieces, receiver) = crossbeam_channel::bounded(QUEUED_CHUNKS);
        let (written, acknowledged) = crossbeam_channel::bounded(1);
        let queued = Queued {
            meta: meta.clone(),
            pieces: receiver,
            written,
        };
        let order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        match order.as_ref().map(|o| o.send(queued)) {
            Some(Ok(())) => Ok(Box::new(StreamFile {
                sink: self,
                pieces,
                acknowledged,
            })),
            _ => Err(self.failure()),
        }
    }

    fn commit(&self, manifest: &[u8]) -> Result<()> {
        let mut file = self.open(&FileMeta::generated(MANIFEST_NAME, manifest.len() as u64))?;
        let crc32 = crc32fast::hash(manifest);
        file.write(Chunk {
            data: Buf::from_vec(manifest.to_vec()),
            crc32,
        })?;
        file.finish(&FileRecord::of_bytes(MANIFEST_NAME, manifest))?;
        match self.close() {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    fn abort(&self) -> Option<Error> {
        self.close()
    }
}

struct StreamFile<'a> {
    sink: &'a StreamSink,
    pieces: Sender<Piece>,
    acknowledged: Receiver<()>,
}

impl SinkFile for StreamFile<'_> {
    fn write(&mut self, chunk: Chunk) -> Result<()> {
        self.pieces
            .send(Piece::Data(chunk))
            .map_err(|_| self.sink.failure())
    }

    fn finish(self: Box<Self>, _record: &FileRecord) -> Result<()> {
        self.pieces
            .send(Piece::End)
            .map_err(|_| self.sink.failure())?;
        self.acknowledged.recv().map_err(|_| self.sink.failure())
    }
}

impl Drop for StreamSink {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tar::TarWriter;

    /// A writer that fails after `left` bytes, like a pipe whose reader went away.
    struct Failing {
        left: usize,
    }

    impl std::io::Write for Failing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.left == 0 {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(self.left);
            self.left -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_writer_s_failure_reaches_the_readers_and_the_abort() {
        let sink = StreamSink::new(Box::new(TarWriter::new(Failing { left: 600 })), 2);
        let data = vec![7u8; 4096];
        let mut failed = None;
        for i in 0..4 {
            let result = sink
                .open(&FileMeta::generated(&format!("f{i}"), data.len() as u64))
                .and_then(|mut f| {
                    f.write(Chunk {
                        data: Buf::from_vec(data.clone()),
                        crc32: crc32fast::hash(&data),
                    })?;
                    f.finish(&FileRecord::of_bytes("f", &data))
                });
            if let Err(e) = result {
                failed = Some(e);
                break;
            }
        }
        let e = failed.expect("a broken pipe is noticed");
        let abort = sink.abort();
        assert!(
            e.is_broken_pipe() || abort.as_ref().is_some_and(Error::is_broken_pipe),
            "{e}, {abort:?}"
        );
    }
}
