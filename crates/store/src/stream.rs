//! The verified stream: how blob bytes travel so that a reader checks every chunk group
//! against the blob id as it arrives.
//!
//! Format: the blob size as 8 bytes little-endian, then bao-tree's pre-order encoding (parent
//! hash pairs and 16 KiB chunk groups) of the requested chunk ranges. The size is not trusted on
//! its own: the ranges always include the last chunk group, whose hash commits to the size.

use std::io::{self, Read, Write};
use std::ops::Range;

use bao_tree::io::EncodeError;
use bao_tree::io::sync::{Outboard, encode_ranges_validated};
use bao_tree::iter::BaoChunk;
use bao_tree::{BaoTree, ChunkNum, ChunkRanges};
use positioned_io::ReadAt;
use vouch_types::BlobId;

use crate::{StoreError, block_size};

/// Bytes in one chunk group.
pub const CHUNK_GROUP_BYTES: u64 = 1024 << crate::CHUNK_GROUP_LOG;

/// The chunk ranges a verified stream of `range` (or of the whole blob) carries: the chunk
/// groups covering it, plus the last chunk group so that the size is authenticated.
pub fn chunk_ranges(range: Option<Range<u64>>, size: u64) -> ChunkRanges {
    let Some(range) = range else {
        return ChunkRanges::all();
    };
    let group = |byte: u64| ChunkNum((byte / CHUNK_GROUP_BYTES) << crate::CHUNK_GROUP_LOG);
    let covering = if range.start < range.end {
        ChunkRanges::from(group(range.start)..group(range.end + CHUNK_GROUP_BYTES - 1))
    } else {
        ChunkRanges::empty()
    };
    let last = group(size.saturating_sub(1));
    covering | ChunkRanges::from(last..)
}

/// Errors while reading a verified stream.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The bytes received do not hash to the blob id.
    #[error("blob {id}: received data does not match its id (at byte {offset})")]
    Mismatch {
        /// The blob.
        id: BlobId,
        /// The first byte of the chunk group that failed.
        offset: u64,
    },
    /// The stream ended early.
    #[error("blob {id}: the stream ended before the blob was complete")]
    Truncated {
        /// The blob.
        id: BlobId,
    },
    /// The announced size is larger than the reader accepts.
    #[error("blob {id} is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        /// The blob.
        id: BlobId,
        /// The announced size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Reading the stream or writing the target failed.
    #[error("blob {id}: {source}")]
    Io {
        /// The blob.
        id: BlobId,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The BLAKE3 chaining value of one chunk group starting at chunk `start_chunk` (the root hash
/// when the group is the whole blob), as bao-tree computes it.
fn leaf_hash(start_chunk: u64, data: &[u8], is_root: bool) -> blake3::Hash {
    use blake3::hazmat::HasherExt;
    if is_root {
        return blake3::hash(data);
    }
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(start_chunk * 1024);
    hasher.update(data);
    blake3::Hash::from(hasher.finalize_non_root())
}

/// The BLAKE3 chaining value of a parent node (the root hash for the root).
fn parent_hash(left: &blake3::Hash, right: &blake3::Hash, is_root: bool) -> blake3::Hash {
    use blake3::hazmat::{Mode, merge_subtrees_non_root, merge_subtrees_root};
    let (left, right) = (left.as_bytes(), right.as_bytes());
    if is_root {
        merge_subtrees_root(left, right, Mode::Hash)
    } else {
        blake3::Hash::from(merge_subtrees_non_root(left, right, Mode::Hash))
    }
}

fn hash_from(bytes: &[u8]) -> blake3::Hash {
    let mut hash = [0u8; 32];
    hash.copy_from_slice(bytes);
    blake3::Hash::from(hash)
}

/// Writes a verified stream from stored `data` and its `outboard`; every chunk group is checked
/// against the outboard (whose root is the id) before it is written.
pub(crate) fn encode(
    id: &BlobId,
    data: impl ReadAt,
    outboard: impl Outboard,
    range: Option<Range<u64>>,
    out: &mut dyn Write,
) -> Result<(), StoreError> {
    let size = outboard.tree().size();
    check_range(id, range.as_ref(), size)?;
    out.write_all(&size.to_le_bytes()).map_err(StoreError::Output)?;
    let ranges = chunk_ranges(range, size);
    encode_ranges_validated(data, outboard, &ranges, out).map_err(|e| encode_error(id, e))
}

/// Writes raw bytes `range` from stored `data`, verifying every chunk group first.
pub(crate) fn read_range(
    id: &BlobId,
    data: impl ReadAt,
    outboard: impl Outboard,
    range: Range<u64>,
    out: &mut dyn Write,
) -> Result<(), StoreError> {
    let tree = outboard.tree();
    check_range(id, Some(&range), tree.size())?;
    if range.is_empty() {
        return Ok(());
    }
    let ranges = chunk_ranges(Some(range.clone()), tree.size());
    let mut filter = LeafFilter {
        items: tree.ranges_pre_order_chunks_iter_ref(&ranges, 0),
        current: None,
        remaining: 0,
        range,
        out,
    };
    encode_ranges_validated(data, outboard, &ranges, &mut filter).map_err(|e| encode_error(id, e))
}

fn check_range(id: &BlobId, range: Option<&Range<u64>>, size: u64) -> Result<(), StoreError> {
    match range {
        Some(r) if r.start > r.end || r.end > size => Err(StoreError::BadRange {
            id: *id,
            start: r.start,
            end: r.end,
            size,
        }),
        _ => Ok(()),
    }
}

fn encode_error(id: &BlobId, error: EncodeError) -> StoreError {
    match error {
        EncodeError::LeafHashMismatch(chunk) => StoreError::Corrupt {
            id: *id,
            offset: chunk.to_bytes(),
        },
        EncodeError::ParentHashMismatch(node) => StoreError::Corrupt {
            id: *id,
            offset: node.chunk_range().start.to_bytes(),
        },
        // The data file is shorter or longer than the outboard says: corrupt as well.
        EncodeError::SizeMismatch => StoreError::Corrupt { id: *id, offset: 0 },
        EncodeError::ParentWrite(_) | EncodeError::LeafWrite(_) => {
            StoreError::Output(io::Error::new(io::ErrorKind::BrokenPipe, "reader went away"))
        }
        EncodeError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => StoreError::Corrupt { id: *id, offset: 0 },
        EncodeError::Io(e) => StoreError::Io(e),
    }
}

/// Passes on the chunk-group bytes of an encoding that fall inside `range` and drops the
/// parent hashes, following the same pre-order walk the encoder makes.
struct LeafFilter<'a, I> {
    items: I,
    /// Byte offset of the leaf being written, or `None` while skipping a parent pair.
    current: Option<u64>,
    remaining: usize,
    range: Range<u64>,
    out: &'a mut dyn Write,
}

impl<'r, I> Write for LeafFilter<'_, I>
where
    I: Iterator<Item = BaoChunk<&'r bao_tree::ChunkRangesRef>>,
{
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let written = buf.len();
        while !buf.is_empty() {
            if self.remaining == 0 {
                match self.items.next() {
                    Some(BaoChunk::Parent { .. }) => {
                        self.current = None;
                        self.remaining = 64;
                    }
                    Some(BaoChunk::Leaf {
                        start_chunk,
                        size,
                        ranges,
                        ..
                    }) => {
                        if !ranges.is_all() {
                            return Err(io::Error::other("partial chunk group in a group-aligned read"));
                        }
                        self.current = Some(start_chunk.to_bytes());
                        self.remaining = size;
                    }
                    None => return Err(io::Error::other("encoder wrote past the end of its walk")),
                }
            }
            let take = self.remaining.min(buf.len());
            if let Some(offset) = self.current {
                let (start, end) = (offset, offset + take as u64);
                let from = self.range.start.clamp(start, end);
                let to = self.range.end.clamp(start, end);
                if from < to {
                    self.out
                        .write_all(&buf[(from - start) as usize..(to - start) as usize])?;
                }
                self.current = Some(end);
            }
            self.remaining -= take;
            buf = &buf[take..];
        }
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Where a verified stream's bytes go: `write_at` receives each verified chunk group at its
/// offset in the blob.
pub trait VerifiedSink {
    /// Called once with the blob size before any data.
    fn begin(&mut self, size: u64) -> io::Result<()>;
    /// A verified chunk group.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Called once after the last chunk group has verified.
    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl VerifiedSink for Vec<u8> {
    fn begin(&mut self, size: u64) -> io::Result<()> {
        let size = usize::try_from(size).map_err(io::Error::other)?;
        self.clear();
        self.resize(size, 0);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let target = self
            .get_mut(start..start + data.len())
            .ok_or_else(|| io::Error::other("write past end"))?;
        target.copy_from_slice(data);
        Ok(())
    }
}

/// Writes verified chunk groups to a file from a second thread ([`crate::WriteBehind`], whole
/// blocks past the page cache where the file system allows), so that verifying the next group
/// overlaps with writing the last.
#[derive(Debug)]
pub struct FileSink {
    sizer: std::fs::File,
    writer: Option<crate::WriteBehind>,
}

impl FileSink {
    /// A sink writing into a new file at `path` (an existing one is truncated).
    pub fn create(path: &std::path::Path) -> io::Result<Self> {
        let file = std::fs::File::create(path)?;
        Ok(Self {
            sizer: file.try_clone()?,
            writer: Some(crate::WriteBehind::new(file, path)),
        })
    }
}

impl VerifiedSink for FileSink {
    fn begin(&mut self, size: u64) -> io::Result<()> {
        self.sizer.set_len(size)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        match &mut self.writer {
            Some(writer) => writer.write_at(offset, data),
            None => Err(io::Error::other("the sink is finished")),
        }
    }
    fn finish(&mut self) -> io::Result<()> {
        match self.writer.take() {
            Some(writer) => writer.finish().map(drop),
            None => Ok(()),
        }
    }
}

/// Reads a verified stream of blob `id` (of `range`, or all of it) from `encoded`, checking
/// every chunk group against the id before handing it to `sink`. Returns the blob size.
pub fn decode(
    id: &BlobId,
    mut encoded: impl Read,
    range: Option<Range<u64>>,
    max_size: u64,
    sink: &mut dyn VerifiedSink,
) -> Result<u64, VerifyError> {
    let io_error = |source| VerifyError::Io { id: *id, source };
    let mut size_bytes = [0u8; 8];
    encoded.read_exact(&mut size_bytes).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => VerifyError::Truncated { id: *id },
        _ => io_error(e),
    })?;
    let size = u64::from_le_bytes(size_bytes);
    if size > max_size {
        return Err(VerifyError::TooLarge {
            id: *id,
            size,
            limit: max_size,
        });
    }
    sink.begin(size).map_err(io_error)?;
    let ranges = chunk_ranges(range, size);
    let tree = BaoTree::new(size, block_size());
    // The hashes still to be checked, in the order the pre-order walk reaches them.
    let mut expected: Vec<blake3::Hash> = vec![blake3::Hash::from(*id.hash())];
    let mut buf = vec![0u8; CHUNK_GROUP_BYTES as usize];
    let read = |encoded: &mut dyn Read, target: &mut [u8]| {
        encoded.read_exact(target).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => VerifyError::Truncated { id: *id },
            _ => io_error(e),
        })
    };
    let mismatch = |offset: u64| VerifyError::Mismatch { id: *id, offset };
    for item in tree.ranges_pre_order_chunks_iter_ref(&ranges, 0) {
        match item {
            BaoChunk::Parent {
                is_root,
                left,
                right,
                node,
                ..
            } => {
                let mut pair = [0u8; 64];
                read(&mut encoded, &mut pair)?;
                let (l, r) = pair.split_at(32);
                let (l, r) = (hash_from(l), hash_from(r));
                let offset = node.chunk_range().start.to_bytes();
                if expected.pop() != Some(parent_hash(&l, &r, is_root)) {
                    return Err(mismatch(offset));
                }
                if right {
                    expected.push(r);
                }
                if left {
                    expected.push(l);
                }
            }
            BaoChunk::Leaf {
                start_chunk,
                size: len,
                is_root,
                ranges,
            } => {
                let offset = start_chunk.to_bytes();
                // Streams carry whole chunk groups (see `chunk_ranges`); anything else is not ours.
                if !ranges.is_all() {
                    return Err(mismatch(offset));
                }
                let data = &mut buf[..len];
                read(&mut encoded, data)?;
                if expected.pop() != Some(leaf_hash(start_chunk.0, data, is_root)) {
                    return Err(mismatch(offset));
                }
                sink.write_at(offset, data).map_err(io_error)?;
            }
        }
    }
    sink.finish().map_err(io_error)?;
    Ok(size)
}
