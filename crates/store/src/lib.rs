//! Store content-addressed blobs and stream them in BLAKE3-verified ranges.
//!
//! A blob is stored once under its [`BlobId`] (the BLAKE3 root of its bytes) together with a
//! bao-tree post-order outboard: the hashes of its 16 KiB chunk groups. Every read checks each
//! chunk group against the id before a byte of it leaves the store, so a byte flipped on disk is
//! detected and never served: the read fails with [`StoreError::Corrupt`] and the blob is put
//! aside. The store moves bytes and never interprets them.

pub mod bridge;
mod disk;
mod memory;
pub mod stream;
mod write_behind;

pub use write_behind::{WriteBehind, Written};

use std::io::{self, Read, Write};
use std::ops::Range;

pub use disk::DiskStore;
pub use memory::MemoryStore;
use vouch_types::BlobId;

/// log2 of the chunks (1 KiB each) in a chunk group: hashes are kept per 16 KiB.
pub const CHUNK_GROUP_LOG: u8 = 4;

/// The chunk group geometry of every Vouch outboard.
pub fn block_size() -> bao_tree::BlockSize {
    bao_tree::BlockSize::from_chunk_log(CHUNK_GROUP_LOG)
}

/// Errors from a blob store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No blob with this id.
    #[error("blob {0} not found")]
    NotFound(BlobId),
    /// The stored bytes no longer match the id; the blob has been put aside.
    #[error("blob {id} is corrupt in storage at byte {offset}; it was put aside and is no longer served")]
    Corrupt {
        /// The blob.
        id: BlobId,
        /// The first byte of the chunk group that failed verification.
        offset: u64,
    },
    /// An upload larger than the store accepts.
    #[error("blob of {size} bytes is larger than the limit of {limit} bytes")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The data ended before the declared size.
    #[error("upload ended after {received} of {expected} bytes")]
    Truncated {
        /// Bytes received.
        received: u64,
        /// Bytes declared.
        expected: u64,
    },
    /// A byte range outside the blob.
    #[error("range {start}..{end} is outside blob {id} of {size} bytes")]
    BadRange {
        /// The blob.
        id: BlobId,
        /// Requested start.
        start: u64,
        /// Requested end.
        end: u64,
        /// The blob's size.
        size: u64,
    },
    /// The reader of a stream went away or failed; nothing is wrong with the blob.
    #[error("output failed: {0}")]
    Output(#[source] io::Error),
    /// The storage itself failed.
    #[error("storage I/O error: {0}")]
    Io(#[from] io::Error),
}

/// The result of storing a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    /// The blob's id.
    pub id: BlobId,
    /// Its size in bytes.
    pub size: u64,
    /// False when the store already held it (nothing was written).
    pub created: bool,
}

/// A content-addressed blob store. Implemented on disk ([`DiskStore`]) and in memory
/// ([`MemoryStore`]); both pass one test suite.
pub trait BlobStore: Send + Sync {
    /// Stores exactly `size` bytes read from `data`. Nothing becomes visible unless all of them
    /// arrive; storing bytes the store already holds writes nothing.
    fn put(&self, data: &mut dyn Read, size: u64) -> Result<PutOutcome, StoreError>;

    /// The size of a blob, or `None` if the store does not hold it.
    fn size(&self, id: &BlobId) -> Result<Option<u64>, StoreError>;

    /// Writes bytes `range` of a blob to `out`, each chunk group verified before it is written.
    fn read_range(&self, id: &BlobId, range: Range<u64>, out: &mut dyn Write) -> Result<(), StoreError>;

    /// Writes a verified stream ([`stream`]) of a blob, or of the chunk groups covering `range`.
    fn write_verified(&self, id: &BlobId, range: Option<Range<u64>>, out: &mut dyn Write) -> Result<(), StoreError>;

    /// Whether a blob was found corrupt and put aside (until the same bytes are stored again).
    fn is_quarantined(&self, id: &BlobId) -> Result<bool, StoreError>;

    /// The ids of all blobs held, in id order.
    fn list(&self) -> Result<Vec<BlobId>, StoreError>;

    /// Stores a blob held in memory.
    fn put_bytes(&self, bytes: &[u8]) -> Result<PutOutcome, StoreError> {
        let mut reader = bytes;
        self.put(&mut reader, bytes.len() as u64)
    }

    /// Reads a whole blob into memory, verified; refuses blobs larger than `max_bytes`.
    fn read_to_vec(&self, id: &BlobId, max_bytes: u64) -> Result<Vec<u8>, StoreError> {
        let size = self.size(id)?.ok_or(StoreError::NotFound(*id))?;
        if size > max_bytes {
            return Err(StoreError::TooLarge { size, limit: max_bytes });
        }
        let mut out = Vec::with_capacity(size as usize);
        self.read_range(id, 0..size, &mut out)?;
        Ok(out)
    }
}

/// Copies exactly `size` bytes from `data` to `sink` while computing the blob id and writing
/// the post-order outboard to `outboard`, in one pass over the bytes.
pub(crate) fn copy_and_hash(
    data: &mut dyn Read,
    size: u64,
    sink: &mut dyn Write,
    outboard: &mut dyn Write,
) -> Result<BlobId, StoreError> {
    struct Tee<'a, 'b> {
        source: io::Take<&'a mut dyn Read>,
        sink: &'b mut dyn Write,
        received: u64,
        sink_error: Option<io::Error>,
    }
    impl Read for Tee<'_, '_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.source.read(buf)?;
            if let Err(e) = self.sink.write_all(&buf[..n]) {
                let message = e.to_string();
                self.sink_error = Some(e);
                return Err(io::Error::other(message));
            }
            self.received += n as u64;
            Ok(n)
        }
    }
    let mut tee = Tee {
        source: data.take(size),
        sink,
        received: 0,
        sink_error: None,
    };
    let tree = bao_tree::BaoTree::new(size, block_size());
    match bao_tree::io::sync::outboard_post_order(&mut tee, tree, outboard) {
        Ok(root) => Ok(BlobId::from_hash(*root.as_bytes())),
        Err(_) if tee.sink_error.is_some() => Err(StoreError::Io(
            tee.sink_error.take().unwrap_or_else(|| io::Error::other("sink failed")),
        )),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(StoreError::Truncated {
            received: tee.received,
            expected: size,
        }),
        Err(e) => Err(StoreError::Io(e)),
    }
}
