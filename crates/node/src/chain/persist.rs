//! A validator's finalized state on disk, so that a restarted validator resumes where it stopped:
//! a journal of the finalized blocks and, every so often, a snapshot of the whole ledger state.
//!
//! Marshal redelivers every block after the last one the application acknowledged, and a block is
//! acknowledged only once it is in the journal, so the snapshot plus the journal always reach at
//! least as far as marshal will resume from.

use std::num::{NonZeroU16, NonZeroUsize};
use std::sync::Arc;

use commonware_codec::RangeCfg;
use commonware_cryptography::Digestible;
use commonware_runtime::buffer::paged::CacheRef;
use commonware_storage::journal::contiguous::Contiguous;
use commonware_storage::journal::contiguous::variable::{Config as JournalConfig, Journal};
use commonware_storage::metadata::{Config as MetadataConfig, Metadata};
use commonware_utils::acknowledgement::Exact;
use commonware_utils::sequence::U64;
use commonware_utils::{Acknowledgement, NZU16, NZU64, NZUsize};
use futures::StreamExt;
use futures::channel::mpsc;
use tracing::{error, info};
use vouch_crypto::Digest;
use vouch_ledger::{Genesis, Ledger, SnapshotError};

use super::block::{ChainBlock, from_chain_digest};

const PAGE_SIZE: NonZeroU16 = NZU16!(4096);
const PAGE_CACHE_PAGES: NonZeroUsize = NZUsize!(64);
/// The metadata key of the state snapshot.
const SNAPSHOT_KEY: u64 = 0;
/// Height, block digest and state root before the snapshot's entries.
const SNAPSHOT_HEADER_BYTES: usize = 8 + 32 + 32;

/// Why the saved state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The storage failed.
    #[error("chain storage: {0}")]
    Storage(String),
    /// The saved snapshot is damaged.
    #[error("saved state: {0}")]
    Snapshot(#[from] SnapshotError),
    /// The journal does not continue the snapshot.
    #[error("saved blocks: {0}")]
    Gap(String),
}

fn storage(error: impl std::fmt::Display) -> PersistError {
    PersistError::Storage(error.to_string())
}

/// The finalized state a validator stopped at.
#[derive(Debug)]
pub struct Recovered {
    /// The height of the snapshot.
    pub height: u64,
    /// The digest of the block at that height.
    pub digest: Digest,
    /// The state after it.
    pub ledger: Arc<Ledger>,
    /// The finalized blocks after the snapshot, in height order.
    pub blocks: Vec<ChainBlock>,
}

/// A block the application applied, waiting to be written before marshal hears it was processed.
#[derive(Debug)]
pub struct Finalization {
    /// The block.
    pub block: ChainBlock,
    /// The state after it.
    pub ledger: Arc<Ledger>,
    /// Told once the block is durable.
    pub ack: Exact,
}

/// Writes finalized blocks and snapshots.
pub struct Persister<E: commonware_storage::Context> {
    journal: Option<Journal<E, ChainBlock>>,
    metadata: Option<Metadata<E, U64, Vec<u8>>>,
    snapshot_interval_blocks: u64,
}

impl<E: commonware_storage::Context> std::fmt::Debug for Persister<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persister")
            .field("snapshot_interval_blocks", &self.snapshot_interval_blocks)
            .finish_non_exhaustive()
    }
}

impl<E: commonware_storage::Context + commonware_runtime::Supervisor> Persister<E> {
    /// Opens the storage under `prefix` and reads back what was saved (none on a first start).
    pub async fn open(
        context: E,
        prefix: &str,
        genesis: &Genesis,
        snapshot_interval_blocks: u64,
    ) -> Result<(Self, Option<Recovered>), PersistError> {
        let journal: Journal<E, ChainBlock> = Journal::init(
            context.child("journal"),
            JournalConfig {
                partition: format!("{prefix}-ledger-blocks"),
                items_per_section: NZU64!(256),
                compression: None,
                codec_config: (),
                page_cache: CacheRef::new(PAGE_SIZE, PAGE_CACHE_PAGES),
                write_buffer: NZUsize!(1 << 20),
                replay_buffer: NZUsize!(1 << 20),
            },
        )
        .await
        .map_err(storage)?;
        let metadata: Metadata<E, U64, Vec<u8>> = Metadata::init(
            context.child("snapshot"),
            MetadataConfig {
                partition: format!("{prefix}-ledger-snapshot"),
                codec_config: (RangeCfg::from(..), ()),
            },
        )
        .await
        .map_err(storage)?;

        let snapshot = match metadata.get(&U64::new(SNAPSHOT_KEY)) {
            Some(bytes) => Some(read_snapshot(genesis, bytes)?),
            None => None,
        };
        let (height, digest, ledger) = match snapshot {
            Some(found) => found,
            None if journal.size() == 0 => {
                return Ok((Self::new(journal, metadata, snapshot_interval_blocks), None));
            }
            None => (
                0,
                from_chain_digest(&super::app::genesis_block(genesis).digest()),
                Arc::new(Ledger::from_genesis(genesis)),
            ),
        };
        let bounds = journal.bounds();
        if bounds.start > height {
            return Err(PersistError::Gap(format!(
                "the snapshot is at height {height} but the saved blocks start after height {}",
                bounds.start
            )));
        }
        let mut blocks = Vec::new();
        for position in height..bounds.end {
            blocks.push(journal.read(position).await.map_err(storage)?);
        }
        info!(height, replay = blocks.len(), "restoring the saved ledger state");
        Ok((
            Self::new(journal, metadata, snapshot_interval_blocks),
            Some(Recovered {
                height,
                digest,
                ledger,
                blocks,
            }),
        ))
    }
}

impl<E: commonware_storage::Context> Persister<E> {
    fn new(journal: Journal<E, ChainBlock>, metadata: Metadata<E, U64, Vec<u8>>, interval: u64) -> Self {
        Self {
            journal: Some(journal),
            metadata: Some(metadata),
            snapshot_interval_blocks: interval.max(1),
        }
    }

    /// Writes each finalized block as it comes and then acknowledges it; stops at the first
    /// storage failure, leaving the block unacknowledged so that marshal redelivers it.
    pub async fn run(mut self, mut finalized: mpsc::UnboundedReceiver<Finalization>) {
        while let Some(finalization) = finalized.next().await {
            if let Err(error) = self.write(&finalization).await {
                error!(%error, "cannot save a finalized block; this validator stops applying blocks");
                return;
            }
            finalization.ack.acknowledge();
        }
    }

    async fn write(&mut self, finalization: &Finalization) -> Result<(), PersistError> {
        let block = finalization.block.block();
        let mut journal = self
            .journal
            .take()
            .ok_or_else(|| PersistError::Storage("journal lost after an earlier failure".into()))?;
        let expected_position = block.height - 1;
        if journal.size() != expected_position {
            return Err(PersistError::Gap(format!(
                "block {} arrived with {} blocks saved",
                block.height,
                journal.size()
            )));
        }
        journal = journal
            .append(&finalization.block)
            .await
            .map_err(storage)?
            .0
            .commit()
            .await
            .map_err(storage)?;
        if block.height.is_multiple_of(self.snapshot_interval_blocks) {
            let mut metadata = self
                .metadata
                .take()
                .ok_or_else(|| PersistError::Storage("snapshot store lost after an earlier failure".into()))?;
            let mut bytes = Vec::with_capacity(SNAPSHOT_HEADER_BYTES);
            bytes.extend_from_slice(&block.height.to_be_bytes());
            bytes.extend_from_slice(from_chain_digest(&finalization.block.digest()).as_bytes());
            bytes.extend_from_slice(block.state_root.as_bytes());
            bytes.extend_from_slice(&finalization.ledger.snapshot());
            metadata.put(U64::new(SNAPSHOT_KEY), bytes);
            metadata = metadata.sync().await.map_err(storage)?;
            self.metadata = Some(metadata);
            // Blocks at or below the snapshot are no longer needed to restart.
            journal = journal.prune(block.height).await.map_err(storage)?.0;
        }
        self.journal = Some(journal);
        Ok(())
    }
}

fn read_snapshot(genesis: &Genesis, bytes: &[u8]) -> Result<(u64, Digest, Arc<Ledger>), PersistError> {
    if bytes.len() < SNAPSHOT_HEADER_BYTES {
        return Err(SnapshotError::Malformed("shorter than its header").into());
    }
    let (header, entries) = bytes.split_at(SNAPSHOT_HEADER_BYTES);
    let mut height = [0u8; 8];
    height.copy_from_slice(&header[..8]);
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&header[8..40]);
    let mut root = [0u8; 32];
    root.copy_from_slice(&header[40..]);
    let ledger = Ledger::from_snapshot(genesis, entries, &Digest::from_bytes(root))?;
    Ok((u64::from_be_bytes(height), Digest::from_bytes(digest), Arc::new(ledger)))
}
