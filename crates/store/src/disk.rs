//! Blobs as files: `blobs/<2 hex>/<hex>.data` and `.obao` (the outboard), uploads staged in
//! `tmp/`, corrupt blobs moved to `quarantine/`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use bao_tree::BaoTree;
use bao_tree::io::outboard::PostOrderOutboard;
use vouch_types::BlobId;

use crate::write_behind::WriteBehind;
use crate::{BlobStore, PutOutcome, StoreError, block_size, copy_and_hash, stream};

/// A blob store in a directory. Crash-safe: an upload becomes visible by one atomic rename
/// after its bytes and outboard are synced, so a killed upload leaves nothing visible, and the
/// staging area is emptied when the store opens.
#[derive(Debug)]
pub struct DiskStore {
    root: PathBuf,
    max_blob_bytes: u64,
}

/// Deletes the staged files of an upload unless it completes.
struct Staged {
    paths: Vec<PathBuf>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        for path in &self.paths {
            let _ = fs::remove_file(path);
        }
    }
}

impl DiskStore {
    /// Opens (creating if needed) a store in `root` that accepts blobs up to `max_blob_bytes`.
    pub fn open(root: &Path, max_blob_bytes: u64) -> Result<Self, StoreError> {
        for dir in ["blobs", "tmp", "quarantine"] {
            fs::create_dir_all(root.join(dir))?;
        }
        // Whatever is staged belongs to uploads that died with an earlier process.
        for entry in fs::read_dir(root.join("tmp"))? {
            fs::remove_file(entry?.path())?;
        }
        let store = Self {
            root: root.to_path_buf(),
            max_blob_bytes,
        };
        store.remove_orphan_outboards()?;
        Ok(store)
    }

    /// The file holding a blob's bytes (whether or not it exists).
    pub fn blob_path(&self, id: &BlobId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("blobs").join(&hex[..2]).join(format!("{hex}.data"))
    }

    fn quarantine_path(&self, id: &BlobId) -> PathBuf {
        self.root.join("quarantine").join(format!("{}.data", id.to_hex()))
    }

    fn outboard_path(&self, id: &BlobId) -> PathBuf {
        self.blob_path(id).with_extension("obao")
    }

    /// Every file in the blob shards.
    fn stored_files(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut files = Vec::new();
        for shard in fs::read_dir(self.root.join("blobs"))? {
            let shard = shard?.path();
            if shard.is_dir() {
                for entry in fs::read_dir(&shard)? {
                    files.push(entry?.path());
                }
            }
        }
        Ok(files)
    }

    /// An outboard without its data file is what a crash between the two renames leaves.
    fn remove_orphan_outboards(&self) -> Result<(), StoreError> {
        for path in self.stored_files()? {
            if path.extension().is_some_and(|e| e == "obao") && !path.with_extension("data").exists() {
                fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    fn staging_path(&self, extension: &str) -> Result<PathBuf, StoreError> {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(self
            .root
            .join("tmp")
            .join(format!("{}.{extension}", hex::encode(nonce))))
    }

    /// Opens a blob for verified reading.
    fn open_blob(&self, id: &BlobId) -> Result<(File, PostOrderOutboard<ReadAhead>), StoreError> {
        let data = match File::open(self.blob_path(id)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotFound(*id)),
            Err(e) => return Err(e.into()),
        };
        let size = data.metadata()?.len();
        let outboard = match File::open(self.outboard_path(id)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(self.quarantine(StoreError::Corrupt { id: *id, offset: 0 }));
            }
            Err(e) => return Err(e.into()),
        };
        let tree = BaoTree::new(size, block_size());
        let outboard = PostOrderOutboard {
            root: blake3::Hash::from(*id.hash()),
            tree,
            data: ReadAhead::new(outboard),
        };
        Ok((data, outboard))
    }

    /// Moves a blob that failed verification out of service, then returns the error.
    fn quarantine(&self, error: StoreError) -> StoreError {
        if let StoreError::Corrupt { id, .. } = &error {
            let dir = self.root.join("quarantine");
            for from in [self.blob_path(id), self.outboard_path(id)] {
                if let Some(name) = from.file_name() {
                    let _ = fs::rename(&from, dir.join(name));
                }
            }
            tracing::error!(blob = %id, "{error}");
        }
        error
    }
}

/// Positioned reads served from a window read ahead of them. A verified read walks the outboard
/// front to back in 64-byte hash pairs; reading it 1 MiB at a time saves a system call per pair.
/// (Chunk groups are read straight from the data file: at 16 KiB a read, a second copy through
/// a window would cost more than the calls it saves.)
struct ReadAhead {
    file: File,
    window: std::cell::RefCell<(u64, Vec<u8>)>,
}

impl ReadAhead {
    const WINDOW_BYTES: usize = 1 << 20;

    fn new(file: File) -> Self {
        Self {
            file,
            window: std::cell::RefCell::new((0, Vec::new())),
        }
    }
}

impl positioned_io::ReadAt for ReadAhead {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        if buf.len() >= Self::WINDOW_BYTES {
            return FileExt::read_at(&self.file, buf, pos);
        }
        let mut window = self.window.borrow_mut();
        let (start, bytes) = &mut *window;
        let inside = pos >= *start && pos + buf.len() as u64 <= *start + bytes.len() as u64;
        if !inside {
            bytes.resize(Self::WINDOW_BYTES, 0);
            let mut filled = 0;
            while filled < bytes.len() {
                match FileExt::read_at(&self.file, &mut bytes[filled..], pos + filled as u64) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            bytes.truncate(filled);
            *start = pos;
        }
        let offset = (pos - *start) as usize;
        let n = buf.len().min(bytes.len().saturating_sub(offset));
        buf[..n].copy_from_slice(&bytes[offset..offset + n]);
        Ok(n)
    }
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

impl BlobStore for DiskStore {
    fn put(&self, data: &mut dyn Read, size: u64) -> Result<PutOutcome, StoreError> {
        if size > self.max_blob_bytes {
            return Err(StoreError::TooLarge {
                size,
                limit: self.max_blob_bytes,
            });
        }
        let data_path = self.staging_path("data")?;
        let outboard_path = self.staging_path("obao")?;
        let staged = Staged {
            paths: vec![data_path.clone(), outboard_path.clone()],
        };
        let create = |path: &Path| OpenOptions::new().write(true).create_new(true).open(path);
        let data_file = create(&data_path)?;
        let mut outboard_file = BufWriter::with_capacity(1 << 16, create(&outboard_path)?);
        let mut writer = WriteBehind::new(data_file, &data_path);
        let copied = copy_and_hash(data, size, &mut writer, &mut outboard_file);
        let written = writer.finish();
        let id = match (copied, written) {
            (Ok(id), Ok(written)) => {
                written.file.sync_all()?;
                id
            }
            // A disk error stops the writer, which the copy sees as a broken pipe: report the cause.
            (Ok(_) | Err(StoreError::Io(_)), Err(disk)) => return Err(StoreError::Io(disk)),
            (Err(error), _) => return Err(error),
        };
        outboard_file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let final_data = self.blob_path(&id);
        if final_data.exists() {
            return Ok(PutOutcome {
                id,
                size,
                created: false,
            });
        }
        let shard = final_data
            .parent()
            .ok_or_else(|| io::Error::other("blob path has no parent"))?;
        fs::create_dir_all(shard)?;
        // The outboard first: a data file is only ever visible with its outboard beside it.
        fs::rename(&outboard_path, self.outboard_path(&id))?;
        fs::rename(&data_path, &final_data)?;
        sync_dir(shard)?;
        drop(staged);
        // Good bytes are back: forget that an earlier copy went bad.
        let _ = fs::remove_file(self.quarantine_path(&id));
        let _ = fs::remove_file(self.quarantine_path(&id).with_extension("obao"));
        Ok(PutOutcome {
            id,
            size,
            created: true,
        })
    }

    fn size(&self, id: &BlobId) -> Result<Option<u64>, StoreError> {
        match fs::metadata(self.blob_path(id)) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn read_range(&self, id: &BlobId, range: Range<u64>, out: &mut dyn Write) -> Result<(), StoreError> {
        let (data, outboard) = self.open_blob(id)?;
        stream::read_range(id, &data, outboard, range, out).map_err(|e| self.quarantine(e))
    }

    fn write_verified(&self, id: &BlobId, range: Option<Range<u64>>, out: &mut dyn Write) -> Result<(), StoreError> {
        let (data, outboard) = self.open_blob(id)?;
        stream::encode(id, &data, outboard, range, out).map_err(|e| self.quarantine(e))
    }

    fn is_quarantined(&self, id: &BlobId) -> Result<bool, StoreError> {
        Ok(self.quarantine_path(id).exists())
    }

    fn list(&self) -> Result<Vec<BlobId>, StoreError> {
        let mut ids: Vec<BlobId> = self
            .stored_files()?
            .iter()
            .filter(|path| path.extension().is_some_and(|e| e == "data"))
            .filter_map(|path| path.file_stem()?.to_str().map(str::to_owned))
            .filter_map(|stem| <[u8; 32]>::try_from(hex::decode(stem).ok()?).ok())
            .map(BlobId::from_hash)
            .collect();
        ids.sort();
        Ok(ids)
    }
}
