//! A file writer whose writes happen on a second thread, so that the thread producing the bytes
//! (receiving, hashing, verifying) never waits for the disk.
//!
//! Where the file system allows it, whole aligned blocks are written with `O_DIRECT`, past the
//! page cache. A big transfer then costs no copy into the page cache and no fresh cache pages,
//! which on the development VM were most of a push's time (docs/BENCHMARKS.md): the writer
//! thread waits on the device while the producer keeps the CPU. The store fsyncs what it
//! writes, so it waits for the device in any case. Unaligned pieces (the tail of a file,
//! positioned writes) go through the page cache, and so does everything on a file system that
//! refuses `O_DIRECT` (tmpfs before Linux 6.6, some FUSE file systems).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// Bytes gathered before a block is handed to the writer thread.
const BLOCK_BYTES: usize = 4 << 20;
/// Blocks queued for the writer thread: with the one being filled and the one being written,
/// a writer holds at most `QUEUE_BLOCKS + 2` blocks.
const QUEUE_BLOCKS: usize = 2;
/// Alignment of buffers, offsets and lengths for `O_DIRECT`: a page, which covers devices with
/// 512-byte and 4 KiB logical blocks.
const DIRECT_ALIGN: usize = 4096;

/// A block buffer whose data starts at a [`DIRECT_ALIGN`]-aligned address.
struct Block {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Block {
    fn new() -> Self {
        let storage = vec![0u8; BLOCK_BYTES + DIRECT_ALIGN];
        // An address that cannot be aligned (never for bytes, in practice) only costs the
        // direct path: such a block goes through the page cache.
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        Self { storage, start, len: 0 }
    }

    fn bytes(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// Appends as much of `data` as fits; returns how much did.
    fn fill(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(BLOCK_BYTES - self.len);
        let at = self.start + self.len;
        self.storage[at..at + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }
}

/// The writer thread's two handles on the file.
struct Target {
    buffered: File,
    direct: Option<File>,
    bytes_past_cache: u64,
}

impl Target {
    fn write_block(&mut self, offset: u64, block: &[u8]) -> io::Result<()> {
        let aligned = offset.is_multiple_of(DIRECT_ALIGN as u64) && block.as_ptr().align_offset(DIRECT_ALIGN) == 0;
        let mut direct_len = if aligned {
            block.len() / DIRECT_ALIGN * DIRECT_ALIGN
        } else {
            0
        };
        if let (Some(direct), true) = (&self.direct, direct_len > 0) {
            match direct.write_all_at(&block[..direct_len], offset) {
                Ok(()) => self.bytes_past_cache += direct_len as u64,
                // The file system took the open but not the write: use the page cache from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct = None;
                    direct_len = 0;
                }
                Err(e) => return Err(e),
            }
        } else {
            direct_len = 0;
        }
        self.buffered
            .write_all_at(&block[direct_len..], offset + direct_len as u64)
    }
}

/// Opens `path` for writes past the page cache, if this platform and file system allow it.
fn open_direct(path: &Path) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// What a finished [`WriteBehind`] wrote.
#[derive(Debug)]
pub struct Written {
    /// The file, for syncing.
    pub file: File,
    /// How many bytes were written past the page cache (`O_DIRECT`).
    pub bytes_past_cache: u64,
}

/// Writes to a file from a background thread, gathering contiguous writes into blocks.
/// [`WriteBehind::finish`] waits for every write and reports the first error.
pub struct WriteBehind {
    full: Option<mpsc::SyncSender<(u64, Block)>>,
    empty: mpsc::Receiver<Block>,
    block: Block,
    block_offset: u64,
    writer: Option<JoinHandle<io::Result<Target>>>,
}

impl std::fmt::Debug for WriteBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBehind")
            .field("block_offset", &self.block_offset)
            .field("pending", &self.block.len)
            .finish_non_exhaustive()
    }
}

impl WriteBehind {
    /// Starts the writer thread for `file`, which is open for writing at `path`; whole aligned
    /// blocks bypass the page cache where the file system allows it.
    pub fn new(file: File, path: &Path) -> Self {
        Self::start(Target {
            buffered: file,
            direct: open_direct(path),
            bytes_past_cache: 0,
        })
    }

    /// Starts the writer thread for `file`, writing everything through the page cache, as on a
    /// file system that refuses `O_DIRECT`.
    #[cfg(test)]
    fn buffered(file: File) -> Self {
        Self::start(Target {
            buffered: file,
            direct: None,
            bytes_past_cache: 0,
        })
    }

    fn start(mut target: Target) -> Self {
        let (full_tx, full_rx) = mpsc::sync_channel::<(u64, Block)>(QUEUE_BLOCKS);
        let (empty_tx, empty_rx) = mpsc::channel::<Block>();
        let writer = std::thread::spawn(move || {
            for (offset, mut block) in full_rx {
                target.write_block(offset, block.bytes())?;
                block.len = 0;
                let _ = empty_tx.send(block);
            }
            Ok(target)
        });
        Self {
            full: Some(full_tx),
            empty: empty_rx,
            block: Block::new(),
            block_offset: 0,
            writer: Some(writer),
        }
    }

    /// Writes `data` at `offset` in the file (eventually).
    pub fn write_at(&mut self, offset: u64, mut data: &[u8]) -> io::Result<()> {
        if offset != self.block_offset + self.block.len as u64 {
            self.send()?;
            self.block_offset = offset;
        }
        while !data.is_empty() {
            data = &data[self.block.fill(data)..];
            if self.block.len == BLOCK_BYTES {
                self.send()?;
            }
        }
        Ok(())
    }

    fn send(&mut self) -> io::Result<()> {
        if self.block.len == 0 {
            return Ok(());
        }
        let next = self.empty.try_recv().unwrap_or_else(|_| Block::new());
        let block = std::mem::replace(&mut self.block, next);
        let offset = self.block_offset;
        self.block_offset += block.len as u64;
        let sent = self.full.as_ref().map(|full| full.send((offset, block)));
        match sent {
            Some(Ok(())) => Ok(()),
            // The writer stopped on an error, which `finish` reports.
            _ => Err(io::Error::new(io::ErrorKind::BrokenPipe, "the writer thread stopped")),
        }
    }

    /// Writes what is pending, waits for the writer thread, and returns the file.
    pub fn finish(mut self) -> io::Result<Written> {
        let sent = self.send();
        let target = self.join()?;
        sent.map(|()| Written {
            file: target.buffered,
            bytes_past_cache: target.bytes_past_cache,
        })
    }

    fn join(&mut self) -> io::Result<Target> {
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
        self.write_at(self.block_offset + self.block.len as u64, data)?;
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

    fn read_file(path: &Path) -> Vec<u8> {
        let mut written = Vec::new();
        File::open(path).expect("open").read_to_end(&mut written).expect("read");
        written
    }

    #[test]
    fn sequential_and_positioned_writes_land_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out");
        // Not a whole number of blocks or pages: the tail goes through the page cache.
        let data: Vec<u8> = (0..3 * BLOCK_BYTES + 123).map(|i| (i % 253) as u8).collect();
        for direct in [true, false] {
            let file = File::create(&path).expect("create");
            let mut writer = if direct {
                WriteBehind::new(file, &path)
            } else {
                WriteBehind::buffered(file)
            };
            writer.write_all(&data[..BLOCK_BYTES + 5]).expect("write");
            writer.write_all(&data[BLOCK_BYTES + 5..]).expect("write");
            writer.write_at(10, b"XYZ").expect("overwrite");
            writer
                .write_at(2 * DIRECT_ALIGN as u64, &[7; DIRECT_ALIGN])
                .expect("overwrite");
            let written = writer.finish().expect("finish");
            let past_cache = if direct && open_direct(&path).is_some() {
                // Every whole page of the three full blocks, and of the tail, went direct; the
                // overwrites are each one block, the first unaligned, the second aligned.
                (3 * BLOCK_BYTES + DIRECT_ALIGN) as u64
            } else {
                0
            };
            assert_eq!(written.bytes_past_cache, past_cache, "direct: {direct}");
            let mut expected = data.clone();
            expected[10..13].copy_from_slice(b"XYZ");
            expected[2 * DIRECT_ALIGN..3 * DIRECT_ALIGN].fill(7);
            assert!(read_file(&path) == expected, "direct: {direct}");
        }
    }

    #[test]
    fn a_write_error_is_reported_by_finish() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("read-only");
        std::fs::write(&path, b"x").expect("create");
        let mut writer = WriteBehind::buffered(File::open(&path).expect("open read-only"));
        let _ = writer.write_all(&vec![1u8; 3 * BLOCK_BYTES]);
        assert!(writer.finish().is_err());
    }
}
