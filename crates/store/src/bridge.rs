//! Move bytes between async streams (HTTP bodies) and the store's blocking readers and writers.
//!
//! Bytes cross between threads in chunks of about [`CHUNK_BYTES`]. Handing over every small
//! network frame would cost a thread wake-up per frame, which on a busy machine costs more than
//! the hashing.

use std::io;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

/// The size of the chunks handed between threads.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Chunks in flight between the two sides: bounds the memory a transfer holds.
const CHANNEL_CHUNKS: usize = 4;

/// A blocking `Read` over batches of frames sent from an async task. Use it on a blocking
/// thread only.
#[derive(Debug)]
pub struct ChunkReader {
    rx: mpsc::Receiver<io::Result<Vec<Bytes>>>,
    frames: std::collections::VecDeque<Bytes>,
}

impl io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.frames.front_mut() {
                Some(frame) if frame.is_empty() => {
                    self.frames.pop_front();
                }
                Some(frame) => {
                    let n = buf.len().min(frame.len());
                    buf[..n].copy_from_slice(&frame.split_to(n));
                    return Ok(n);
                }
                None => match self.rx.blocking_recv() {
                    Some(Ok(batch)) => self.frames.extend(batch),
                    Some(Err(e)) => return Err(e),
                    None => return Ok(0),
                },
            }
        }
    }
}

/// Returns a blocking reader of `stream`, and the future that feeds it (spawn it on the runtime).
/// Frames are passed on without copying, in batches of at least [`CHUNK_BYTES`].
pub fn reader<S, E>(stream: S) -> (ChunkReader, impl Future<Output = ()> + Send + 'static)
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let pump = async move {
        let mut stream = std::pin::pin!(stream);
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        loop {
            match stream.next().await {
                Some(Ok(frame)) => {
                    batch_bytes += frame.len();
                    batch.push(frame);
                    if batch_bytes >= CHUNK_BYTES {
                        batch_bytes = 0;
                        if tx.send(Ok(std::mem::take(&mut batch))).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                    return;
                }
                None => {
                    if !batch.is_empty() {
                        let _ = tx.send(Ok(batch)).await;
                    }
                    return;
                }
            }
        }
    };
    (
        ChunkReader {
            rx,
            frames: std::collections::VecDeque::new(),
        },
        pump,
    )
}

/// A blocking `Write` whose bytes an async receiver gets in chunks. Use it on a blocking thread
/// only; a write fails with `BrokenPipe` once the receiver is gone.
#[derive(Debug)]
pub struct ChunkWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
}

impl ChunkWriter {
    /// A writer and the receiving end of its chunks.
    pub fn new() -> (Self, mpsc::Receiver<io::Result<Bytes>>) {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        (
            Self {
                tx,
                buf: BytesMut::with_capacity(CHUNK_BYTES),
            },
            rx,
        )
    }

    /// Sends `error` to the receiver in place of further data.
    pub fn fail(&self, error: io::Error) {
        let _ = self.tx.blocking_send(Err(error));
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.buf.reserve(CHUNK_BYTES);
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the receiver went away"))
    }
}

impl io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK_BYTES {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn a_reader_sees_every_byte_in_order_then_the_end() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let frames: Vec<Result<Bytes, String>> = (0..300u32)
            .map(|i| Ok(Bytes::from(vec![(i % 256) as u8; 7000 + i as usize])))
            .collect();
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.as_ref().expect("ok").to_vec()).collect();
        let (mut reader, pump) = reader(futures::stream::iter(frames));
        let handle = std::thread::spawn(move || {
            let mut out = Vec::new();
            reader.read_to_end(&mut out).map(|_| out)
        });
        runtime.block_on(pump);
        assert_eq!(handle.join().expect("thread").expect("read"), expected);
    }

    #[test]
    fn a_stream_error_reaches_the_reader() {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let frames = vec![Ok(Bytes::from_static(b"abc")), Err("connection reset")];
        let (mut reader, pump) = reader(futures::stream::iter(frames));
        let handle = std::thread::spawn(move || reader.read_to_end(&mut Vec::new()));
        runtime.block_on(pump);
        let error = handle.join().expect("thread").expect_err("the error surfaces");
        assert!(error.to_string().contains("connection reset"));
    }

    #[test]
    fn a_writer_delivers_chunks_and_notices_a_gone_receiver() {
        let (mut writer, mut rx) = ChunkWriter::new();
        let handle = std::thread::spawn(move || {
            writer.write_all(&vec![5u8; 3 * CHUNK_BYTES + 10])?;
            writer.flush()
        });
        let mut total = 0;
        while let Some(chunk) = rx.blocking_recv() {
            total += chunk.expect("data").len();
        }
        handle.join().expect("thread").expect("write");
        assert_eq!(total, 3 * CHUNK_BYTES + 10);
        let (mut writer, rx) = ChunkWriter::new();
        drop(rx);
        let error = writer.write_all(&vec![0u8; CHUNK_BYTES]).expect_err("receiver is gone");
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
    }
}
