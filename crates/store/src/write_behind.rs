//! A file writer whose writes happen on a second thread, so that the thread producing the bytes
//! (receiving, hashing, verifying) never waits for the copy into the page cache.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// Bytes gathered before a block is handed to the writer thread.
const BLOCK_BYTES: usize = 1 << 20;
/// Blocks queued for the writer thread: bounds the memory a writer holds.
const QUEUE_BLOCKS: usize = 4;

/// Writes to a file from a background thread, gathering contiguous writes into 1 MiB blocks.
/// [`WriteBehind::finish`] waits for every write and reports the first error.
#[derive(Debug)]
pub struct WriteBehind {
    full: Option<mpsc::SyncSender<(u64, Vec<u8>)>>,
    empty: mpsc::Receiver<Vec<u8>>,
    block: Vec<u8>,
    block_offset: u64,
    writer: Option<JoinHandle<io::Result<File>>>,
}

impl WriteBehind {
    /// Starts the writer thread for `file`.
    pub fn new(file: File) -> Self {
        let (full_tx, full_rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(QUEUE_BLOCKS);
        let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
        let writer = std::thread::spawn(move || {
            for (offset, mut block) in full_rx {
                file.write_all_at(&block, offset)?;
                block.clear();
                let _ = empty_tx.send(block);
            }
            Ok(file)
        });
        Self {
            full: Some(full_tx),
            empty: empty_rx,
            block: Vec::with_capacity(BLOCK_BYTES),
            block_offset: 0,
            writer: Some(writer),
        }
    }

    /// Writes `data` at `offset` in the file (eventually).
    pub fn write_at(&mut self, offset: u64, mut data: &[u8]) -> io::Result<()> {
        if offset != self.block_offset + self.block.len() as u64 {
            self.send()?;
            self.block_offset = offset;
        }
        while !data.is_empty() {
            let n = data.len().min(BLOCK_BYTES - self.block.len());
            self.block.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.block.len() == BLOCK_BYTES {
                self.send()?;
            }
        }
        Ok(())
    }

    fn send(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let next = self
            .empty
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BLOCK_BYTES));
        let block = std::mem::replace(&mut self.block, next);
        let offset = self.block_offset;
        self.block_offset += block.len() as u64;
        let sent = self.full.as_ref().map(|full| full.send((offset, block)));
        match sent {
            Some(Ok(())) => Ok(()),
            // The writer stopped on an error, which `finish` reports.
            _ => Err(io::Error::new(io::ErrorKind::BrokenPipe, "the writer thread stopped")),
        }
    }

    /// Writes what is pending, waits for the writer thread, and returns the file.
    pub fn finish(mut self) -> io::Result<File> {
        let sent = self.send();
        let written = self.join();
        let file = written?;
        sent.map(|()| file)
    }

    fn join(&mut self) -> io::Result<File> {
        self.full.take();
        match self.writer.take() {
            Some(writer) => writer
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the writer thread panicked"))),
            None => Err(io::Error::other("the writer was already finished")),
        }
    }
}

impl Write for WriteBehind {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_at(self.block_offset + self.block.len() as u64, data)?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        if self.writer.is_some() {
            let _ = self.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn sequential_and_positioned_writes_land_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out");
        let mut writer = WriteBehind::new(File::create(&path).expect("create"));
        let data: Vec<u8> = (0..3 * BLOCK_BYTES + 123).map(|i| (i % 253) as u8).collect();
        writer.write_all(&data[..BLOCK_BYTES + 5]).expect("write");
        writer.write_all(&data[BLOCK_BYTES + 5..]).expect("write");
        writer.write_at(10, b"XYZ").expect("overwrite");
        writer.finish().expect("finish");
        let mut written = Vec::new();
        File::open(&path)
            .expect("open")
            .read_to_end(&mut written)
            .expect("read");
        let mut expected = data;
        expected[10..13].copy_from_slice(b"XYZ");
        assert_eq!(written, expected);
    }

    #[test]
    fn a_write_error_is_reported_by_finish() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("read-only");
        std::fs::write(&path, b"x").expect("create");
        let mut writer = WriteBehind::new(File::open(&path).expect("open read-only"));
        let _ = writer.write_all(&vec![1u8; 3 * BLOCK_BYTES]);
        assert!(writer.finish().is_err());
    }
}
