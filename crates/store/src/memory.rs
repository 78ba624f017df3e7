//! Blobs in memory: for tests and simulations, with the same contract as the disk store.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::ops::Range;
use std::sync::{Arc, RwLock};

use bao_tree::BaoTree;
use bao_tree::io::outboard::PostOrderOutboard;
use vouch_types::BlobId;

use crate::{BlobStore, PutOutcome, StoreError, block_size, copy_and_hash, stream};

/// A blob's bytes and its post-order outboard.
#[derive(Debug)]
struct Entry {
    data: Vec<u8>,
    outboard: Vec<u8>,
}

/// A blob store in memory.
#[derive(Debug)]
pub struct MemoryStore {
    blobs: RwLock<BTreeMap<BlobId, Arc<Entry>>>,
    quarantined: RwLock<BTreeSet<BlobId>>,
    max_blob_bytes: u64,
}

impl MemoryStore {
    /// An empty store that accepts blobs up to `max_blob_bytes`.
    pub fn new(max_blob_bytes: u64) -> Self {
        Self {
            blobs: RwLock::new(BTreeMap::new()),
            quarantined: RwLock::new(BTreeSet::new()),
            max_blob_bytes,
        }
    }

    fn entry(&self, id: &BlobId) -> Result<Arc<Entry>, StoreError> {
        let blobs = self.blobs.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        blobs.get(id).cloned().ok_or(StoreError::NotFound(*id))
    }

    /// Flips one bit of a stored blob, to exercise corruption handling the way a failing disk would.
    pub fn corrupt_for_testing(&self, id: &BlobId, offset: usize) -> Result<(), StoreError> {
        let mut blobs = self.blobs.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = blobs.get_mut(id).ok_or(StoreError::NotFound(*id))?;
        let mut data = entry.data.clone();
        if let Some(byte) = data.get_mut(offset) {
            *byte ^= 1;
        }
        *entry = Arc::new(Entry {
            data,
            outboard: entry.outboard.clone(),
        });
        Ok(())
    }

    fn with_verified<T>(
        &self,
        id: &BlobId,
        read: impl FnOnce(&[u8], PostOrderOutboard<&[u8]>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let entry = self.entry(id)?;
        let tree = BaoTree::new(entry.data.len() as u64, block_size());
        let outboard = PostOrderOutboard {
            root: blake3::Hash::from(*id.hash()),
            tree,
            data: entry.outboard.as_slice(),
        };
        read(&entry.data, outboard).inspect_err(|error| {
            if matches!(error, StoreError::Corrupt { .. }) {
                self.blobs
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .remove(id);
                self.quarantined
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(*id);
            }
        })
    }
}

impl BlobStore for MemoryStore {
    fn put(&self, data: &mut dyn Read, size: u64) -> Result<PutOutcome, StoreError> {
        if size > self.max_blob_bytes {
            return Err(StoreError::TooLarge {
                size,
                limit: self.max_blob_bytes,
            });
        }
        let mut bytes = Vec::with_capacity(size.min(1 << 24) as usize);
        let mut outboard = Vec::new();
        let id = copy_and_hash(data, size, &mut bytes, &mut outboard)?;
        let mut blobs = self.blobs.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let created = !blobs.contains_key(&id);
        if created {
            blobs.insert(id, Arc::new(Entry { data: bytes, outboard }));
            self.quarantined
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .remove(&id);
        }
        Ok(PutOutcome { id, size, created })
    }

    fn size(&self, id: &BlobId) -> Result<Option<u64>, StoreError> {
        let blobs = self.blobs.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(blobs.get(id).map(|entry| entry.data.len() as u64))
    }

    fn read_range(&self, id: &BlobId, range: Range<u64>, out: &mut dyn Write) -> Result<(), StoreError> {
        self.with_verified(id, |data, outboard| stream::read_range(id, data, outboard, range, out))
    }

    fn write_verified(&self, id: &BlobId, range: Option<Range<u64>>, out: &mut dyn Write) -> Result<(), StoreError> {
        self.with_verified(id, |data, outboard| stream::encode(id, data, outboard, range, out))
    }

    fn is_quarantined(&self, id: &BlobId) -> Result<bool, StoreError> {
        Ok(self
            .quarantined
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(id))
    }

    fn list(&self) -> Result<Vec<BlobId>, StoreError> {
        let blobs = self.blobs.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(blobs.keys().copied().collect())
    }
}
