//! The model registry: which manifest each `name@version` names, who owns each name, and which
//! blob holds the outputs this node computed for each quorum task.
//! Kept in redb, whose transactions are atomic and durable, so a crash never leaves half a
//! publication.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use vouch_crypto::PublicKey;
use vouch_types::{BlobId, Manifest, ManifestLimits, ModelId, ModelName, ModelRef, Version};

/// `name@version` → model id.
const VERSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("versions");
/// name → publisher key of its first version.
const OWNERS: TableDefinition<&str, &[u8]> = TableDefinition::new("owners");
/// model id → canonical manifest bytes.
const MANIFESTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("manifests");
/// model id → publication sequence number.
const SEQ_BY_MODEL: TableDefinition<&[u8], u64> = TableDefinition::new("seq_by_model");
/// publication sequence number → model id.
const MODEL_BY_SEQ: TableDefinition<u64, &[u8]> = TableDefinition::new("model_by_seq");
/// blob id → the first model published that lists it (a file or a plan): where a node that
/// lacks the blob can ask for it.
const MODEL_BY_BLOB: TableDefinition<&[u8], &[u8]> = TableDefinition::new("model_by_blob");
/// quorum task id → the blob holding the outputs this node computed (or fetched) for it.
const TASK_OUTPUTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("task_outputs");

/// Errors from the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The version is published already, as another manifest.
    #[error("{name}@{version} is already published as {existing}; a published version is immutable")]
    VersionExists {
        /// The name.
        name: ModelName,
        /// The version.
        version: Version,
        /// What it is published as.
        existing: ModelId,
    },
    /// The name belongs to another publisher.
    #[error("{name} belongs to publisher {owner}; only that key may publish versions of it")]
    NameOwned {
        /// The name.
        name: ModelName,
        /// Its owner.
        owner: PublicKey,
    },
    /// The database refused to open because another process holds it.
    #[error("the registry database {0} is in use by another node")]
    InUse(String),
    /// Stored bytes failed to decode: the database was damaged or written by other software.
    #[error("registry data is damaged: {0}")]
    Damaged(String),
    /// The database failed.
    #[error("registry database error: {0}")]
    Database(String),
}

macro_rules! db_error {
    ($($t:ty),*) => {$(
        impl From<$t> for RegistryError {
            fn from(e: $t) -> Self {
                Self::Database(e.to_string())
            }
        }
    )*};
}
db_error!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A published model as the registry holds it.
#[derive(Debug, Clone)]
pub struct Published {
    /// The model id.
    pub id: ModelId,
    /// Publication order on this node.
    pub seq: u64,
    /// The signed manifest.
    pub manifest: Manifest,
}

/// The outcome of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Newly published.
    Created,
    /// The identical manifest was already published.
    AlreadyPublished,
    /// Checked and stored, waiting for the ledger to publish it (network nodes only; the
    /// registry itself never answers this).
    Staged,
}

/// The registry database.
#[derive(Debug)]
pub struct Registry {
    db: Database,
    limits: ManifestLimits,
}

impl Registry {
    /// Opens or creates the registry at `path`.
    pub fn open(path: &Path, limits: ManifestLimits) -> Result<Self, RegistryError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => RegistryError::InUse(path.display().to_string()),
            other => RegistryError::Database(other.to_string()),
        })?;
        let txn = db.begin_write()?;
        txn.open_table(VERSIONS)?;
        txn.open_table(OWNERS)?;
        txn.open_table(MANIFESTS)?;
        txn.open_table(SEQ_BY_MODEL)?;
        txn.open_table(MODEL_BY_SEQ)?;
        txn.open_table(MODEL_BY_BLOB)?;
        txn.open_table(TASK_OUTPUTS)?;
        txn.commit()?;
        Ok(Self { db, limits })
    }

    /// Records `manifest` (already verified, its bytes already stored) as published. The checks
    /// and the writes happen in one transaction, so concurrent publishes cannot both win.
    pub fn publish(&self, manifest: &Manifest) -> Result<PublishOutcome, RegistryError> {
        let id = manifest.id();
        let body = &manifest.body;
        let key = format!("{}@{}", body.name, body.version);
        let txn = self.db.begin_write()?;
        {
            let mut versions = txn.open_table(VERSIONS)?;
            if let Some(existing) = versions.get(key.as_str())? {
                let existing = model_id(existing.value())?;
                if existing == id {
                    return Ok(PublishOutcome::AlreadyPublished);
                }
                return Err(RegistryError::VersionExists {
                    name: body.name.clone(),
                    version: body.version.clone(),
                    existing,
                });
            }
            let mut owners = txn.open_table(OWNERS)?;
            let owner = owners
                .get(body.name.as_str())?
                .map(|owner| public_key(owner.value()))
                .transpose()?;
            match owner {
                Some(owner) if owner != body.publisher => {
                    return Err(RegistryError::NameOwned {
                        name: body.name.clone(),
                        owner,
                    });
                }
                Some(_) => {}
                None => {
                    owners.insert(body.name.as_str(), body.publisher.as_bytes().as_slice())?;
                }
            }
            let mut by_seq = txn.open_table(MODEL_BY_SEQ)?;
            let seq = by_seq.last()?.map_or(1, |(seq, _)| seq.value() + 1);
            by_seq.insert(seq, id.0.hash().as_slice())?;
            versions.insert(key.as_str(), id.0.hash().as_slice())?;
            txn.open_table(SEQ_BY_MODEL)?.insert(id.0.hash().as_slice(), seq)?;
            txn.open_table(MANIFESTS)?
                .insert(id.0.hash().as_slice(), manifest.encode().as_slice())?;
            let mut by_blob = txn.open_table(MODEL_BY_BLOB)?;
            let files = body.files.iter().map(|file| file.blob);
            for blob in files.chain(body.plans.iter().map(|plan| plan.id)) {
                if by_blob.get(blob.hash().as_slice())?.is_none() {
                    by_blob.insert(blob.hash().as_slice(), id.0.hash().as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(PublishOutcome::Created)
    }

    /// Finds the model a reference names.
    pub fn resolve(&self, reference: &ModelRef) -> Result<Option<Published>, RegistryError> {
        let txn = self.db.begin_read()?;
        let id = match reference {
            ModelRef::Id(id) => Some(*id),
            ModelRef::Version(name, version) => {
                let versions = txn.open_table(VERSIONS)?;
                let key = format!("{name}@{version}");
                versions.get(key.as_str())?.map(|v| model_id(v.value())).transpose()?
            }
            ModelRef::Latest(name) => {
                let versions = txn.open_table(VERSIONS)?;
                // Keys are `name@version` and names hold no '@', so this range is exactly the
                // name's versions ('A' follows '@' in ASCII).
                let (start, end) = (format!("{name}@"), format!("{name}A"));
                let mut latest: Option<(Version, ModelId)> = None;
                for entry in versions.range(start.as_str()..end.as_str())? {
                    let (key, value) = entry?;
                    let version: Version = key
                        .value()
                        .split_once('@')
                        .and_then(|(_, v)| v.parse().ok())
                        .ok_or_else(|| RegistryError::Damaged(format!("bad version key {}", key.value())))?;
                    if latest.as_ref().is_none_or(|(best, _)| version > *best) {
                        latest = Some((version, model_id(value.value())?));
                    }
                }
                latest.map(|(_, id)| id)
            }
        };
        match id {
            Some(id) => self.load(&txn, id),
            None => Ok(None),
        }
    }

    /// Published models in publication order, optionally of one name, at most `limit`.
    pub fn list(&self, name: Option<&ModelName>, limit: usize) -> Result<Vec<Published>, RegistryError> {
        let txn = self.db.begin_read()?;
        let by_seq = txn.open_table(MODEL_BY_SEQ)?;
        let mut out = Vec::new();
        for entry in by_seq.iter()? {
            if out.len() >= limit {
                break;
            }
            let (_, id) = entry?;
            let Some(published) = self.load(&txn, model_id(id.value())?)? else {
                return Err(RegistryError::Damaged("a listed model has no manifest".into()));
            };
            if name.is_none_or(|name| *name == published.manifest.body.name) {
                out.push(published);
            }
        }
        Ok(out)
    }

    /// A published model that lists `blob` among its files or plans, if any.
    pub fn model_holding(&self, blob: &BlobId) -> Result<Option<ModelId>, RegistryError> {
        let txn = self.db.begin_read()?;
        let by_blob = txn.open_table(MODEL_BY_BLOB)?;
        by_blob
            .get(blob.hash().as_slice())?
            .map(|id| model_id(id.value()))
            .transpose()
    }

    /// Records that the blob `outputs` holds the outputs of quorum task `task`.
    pub fn record_task_output(&self, task: &vouch_crypto::Digest, outputs: &BlobId) -> Result<(), RegistryError> {
        let txn = self.db.begin_write()?;
        txn.open_table(TASK_OUTPUTS)?
            .insert(task.as_bytes().as_slice(), outputs.hash().as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// The blob holding the outputs of quorum task `task`, if this node has them.
    pub fn task_output(&self, task: &vouch_crypto::Digest) -> Result<Option<BlobId>, RegistryError> {
        let txn = self.db.begin_read()?;
        let outputs = txn.open_table(TASK_OUTPUTS)?;
        outputs
            .get(task.as_bytes().as_slice())?
            .map(|blob| blob_id(blob.value(), "an output blob id"))
            .transpose()
    }

    fn load(&self, txn: &redb::ReadTransaction, id: ModelId) -> Result<Option<Published>, RegistryError> {
        let manifests = txn.open_table(MANIFESTS)?;
        let Some(bytes) = manifests.get(id.0.hash().as_slice())? else {
            return Ok(None);
        };
        let manifest =
            Manifest::decode(bytes.value(), &self.limits).map_err(|e| RegistryError::Damaged(e.to_string()))?;
        let seq = txn
            .open_table(SEQ_BY_MODEL)?
            .get(id.0.hash().as_slice())?
            .map(|s| s.value())
            .ok_or_else(|| RegistryError::Damaged(format!("model {id} has no sequence number")))?;
        Ok(Some(Published { id, seq, manifest }))
    }
}

fn model_id(bytes: &[u8]) -> Result<ModelId, RegistryError> {
    blob_id(bytes, "a model id").map(ModelId)
}

fn blob_id(bytes: &[u8], what: &str) -> Result<BlobId, RegistryError> {
    <[u8; 32]>::try_from(bytes)
        .map(BlobId::from_hash)
        .map_err(|_| RegistryError::Damaged(format!("{what} is not 32 bytes")))
}

fn public_key(bytes: &[u8]) -> Result<PublicKey, RegistryError> {
    <[u8; 32]>::try_from(bytes)
        .map(PublicKey::from_bytes)
        .map_err(|_| RegistryError::Damaged("a publisher key is not 32 bytes".into()))
}
