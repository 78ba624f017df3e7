//! One suite, run against both the on-disk and the in-memory store.

use std::io::Read;

use proptest::prelude::*;
use vouch_store::stream::{self, VerifyError};
use vouch_store::{BlobStore, DiskStore, MemoryStore, StoreError};
use vouch_types::BlobId;

const LIMIT: u64 = 8 << 20;

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The sizes around every chunk and chunk-group boundary that matter.
const SIZES: [usize; 10] = [0, 1, 1023, 1024, 1025, 16383, 16384, 16385, 100_000, 1_000_003];

/// A store plus a way to damage one byte of a stored blob.
trait Harness {
    fn store(&self) -> &dyn BlobStore;
    fn corrupt(&self, id: &BlobId, offset: usize);
}

struct Disk {
    _dir: tempfile::TempDir,
    store: DiskStore,
}

impl Harness for Disk {
    fn store(&self) -> &dyn BlobStore {
        &self.store
    }
    fn corrupt(&self, id: &BlobId, offset: usize) {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.store.blob_path(id))
            .expect("open blob");
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, offset as u64).expect("read byte");
        file.write_all_at(&[byte[0] ^ 1], offset as u64).expect("write byte");
    }
}

impl Harness for MemoryStore {
    fn store(&self) -> &dyn BlobStore {
        self
    }
    fn corrupt(&self, id: &BlobId, offset: usize) {
        self.corrupt_for_testing(id, offset).expect("blob exists");
    }
}

fn disk() -> Disk {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = DiskStore::open(dir.path(), LIMIT).expect("open store");
    Disk { _dir: dir, store }
}

fn memory() -> MemoryStore {
    MemoryStore::new(LIMIT)
}

fn round_trips_every_boundary_size(h: &dyn Harness) {
    for (seed, size) in SIZES.iter().enumerate() {
        let data = bytes(*size, seed as u64);
        let outcome = h.store().put_bytes(&data).expect("put");
        assert_eq!(outcome.id, BlobId::of(&data), "id of {size} bytes");
        assert!(outcome.created);
        assert_eq!(h.store().size(&outcome.id).expect("size"), Some(*size as u64));
        assert_eq!(
            h.store().read_to_vec(&outcome.id, LIMIT).expect("read"),
            data,
            "{size} bytes"
        );
    }
}

fn stores_each_blob_once(h: &dyn Harness) {
    let data = bytes(50_000, 7);
    let first = h.store().put_bytes(&data).expect("put");
    let second = h.store().put_bytes(&data).expect("put again");
    assert_eq!(first.id, second.id);
    assert!(first.created && !second.created);
    assert_eq!(h.store().list().expect("list"), vec![first.id]);
}

fn serves_exact_byte_ranges(h: &dyn Harness) {
    let data = bytes(200_001, 3);
    let id = h.store().put_bytes(&data).expect("put").id;
    let cases = [
        (0, 0),
        (0, 1),
        (5, 17),
        (16383, 16385),
        (16384, 32768),
        (100_000, 200_001),
        (200_000, 200_001),
        (0, 200_001),
    ];
    for (start, end) in cases {
        let mut out = Vec::new();
        h.store().read_range(&id, start..end, &mut out).expect("range");
        assert_eq!(out, &data[start as usize..end as usize], "{start}..{end}");
    }
    let mut out = Vec::new();
    assert!(matches!(
        h.store().read_range(&id, 10..200_002, &mut out),
        Err(StoreError::BadRange { .. })
    ));
}

fn verified_streams_decode_and_catch_tampering(h: &dyn Harness) {
    for (seed, size) in SIZES.iter().enumerate() {
        let data = bytes(*size, 100 + seed as u64);
        let id = h.store().put_bytes(&data).expect("put").id;
        let mut encoded = Vec::new();
        h.store().write_verified(&id, None, &mut encoded).expect("encode");
        let mut decoded = Vec::new();
        let decoded_size = stream::decode(&id, encoded.as_slice(), None, LIMIT, &mut decoded).expect("decode");
        assert_eq!(decoded_size, *size as u64);
        assert_eq!(decoded, data);
        if *size > 0 {
            // Flip a data byte in transit: the reader must notice.
            let mut tampered = encoded.clone();
            let last = tampered.len() - 1;
            tampered[last] ^= 1;
            let result = stream::decode(&id, tampered.as_slice(), None, LIMIT, &mut Vec::new());
            assert!(
                matches!(result, Err(VerifyError::Mismatch { .. })),
                "{size}: {result:?}"
            );
            let truncated = &encoded[..encoded.len() - 1];
            let result = stream::decode(&id, truncated, None, LIMIT, &mut Vec::new());
            assert!(
                matches!(result, Err(VerifyError::Truncated { .. })),
                "{size}: {result:?}"
            );
            // A stream for other bytes never verifies against this id.
            let other = BlobId::of(b"something else");
            assert!(stream::decode(&other, encoded.as_slice(), None, LIMIT, &mut Vec::new()).is_err());
        }
    }
}

fn verified_ranges_decode(h: &dyn Harness) {
    let data = bytes(300_000, 11);
    let id = h.store().put_bytes(&data).expect("put").id;
    for (start, end) in [(0u64, 10u64), (20_000, 40_000), (299_990, 300_000)] {
        let mut encoded = Vec::new();
        h.store()
            .write_verified(&id, Some(start..end), &mut encoded)
            .expect("encode");
        assert!(encoded.len() < data.len(), "a range stream carries less than the blob");
        let mut decoded = Vec::new();
        stream::decode(&id, encoded.as_slice(), Some(start..end), LIMIT, &mut decoded).expect("decode range");
        assert_eq!(
            &decoded[start as usize..end as usize],
            &data[start as usize..end as usize]
        );
    }
}

fn refuses_oversize_and_short_uploads(h: &dyn Harness) {
    let mut empty: &[u8] = &[];
    assert!(matches!(
        h.store().put(&mut empty, LIMIT + 1),
        Err(StoreError::TooLarge { .. })
    ));
    let data = bytes(40_000, 5);
    let mut short = &data[..30_000];
    let result = h.store().put(&mut short, 40_000);
    assert!(
        matches!(
            result,
            Err(StoreError::Truncated {
                received: 30_000,
                expected: 40_000
            })
        ),
        "{result:?}"
    );
    assert!(
        h.store().list().expect("list").is_empty(),
        "nothing visible after failed uploads"
    );
}

fn reports_missing_blobs(h: &dyn Harness) {
    let id = BlobId::of(b"never stored");
    assert_eq!(h.store().size(&id).expect("size"), None);
    assert!(matches!(
        h.store().read_to_vec(&id, LIMIT),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        h.store().write_verified(&id, None, &mut Vec::new()),
        Err(StoreError::NotFound(_))
    ));
}

fn detects_corruption_and_heals_on_re_put(h: &dyn Harness) {
    let data = bytes(100_000, 9);
    let id = h.store().put_bytes(&data).expect("put").id;
    let other = h.store().put_bytes(&bytes(1000, 10)).expect("put other").id;
    h.corrupt(&id, 70_000);
    // Bytes before the damage are fine; the damaged chunk group is never served.
    let mut out = Vec::new();
    h.store()
        .read_range(&id, 0..1000, &mut out)
        .expect("undamaged range still verifies");
    let mut out = Vec::new();
    let result = h.store().read_range(&id, 0..100_000, &mut out);
    assert!(
        matches!(result, Err(StoreError::Corrupt { offset: 65536, .. })),
        "{result:?}"
    );
    assert!(out.len() <= 65536, "nothing from the damaged group was written");
    assert_eq!(h.store().size(&id).expect("size"), None, "a corrupt blob is put aside");
    assert!(h.store().is_quarantined(&id).expect("quarantine state"));
    assert_eq!(
        h.store()
            .read_to_vec(&other, LIMIT)
            .expect("other blobs unaffected")
            .len(),
        1000
    );
    assert!(h.store().put_bytes(&data).expect("re-put").created);
    assert!(!h.store().is_quarantined(&id).expect("quarantine state"));
    assert_eq!(h.store().read_to_vec(&id, LIMIT).expect("healed"), data);
}

fn corruption_is_caught_in_verified_streams(h: &dyn Harness) {
    let data = bytes(10_000, 12);
    let id = h.store().put_bytes(&data).expect("put").id;
    h.corrupt(&id, 5);
    let result = h.store().write_verified(&id, None, &mut Vec::new());
    assert!(matches!(result, Err(StoreError::Corrupt { .. })), "{result:?}");
}

macro_rules! suite {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;
            #[test]
            fn round_trips_every_boundary_size() {
                super::round_trips_every_boundary_size(&$make);
            }
            #[test]
            fn stores_each_blob_once() {
                super::stores_each_blob_once(&$make);
            }
            #[test]
            fn serves_exact_byte_ranges() {
                super::serves_exact_byte_ranges(&$make);
            }
            #[test]
            fn verified_streams_decode_and_catch_tampering() {
                super::verified_streams_decode_and_catch_tampering(&$make);
            }
            #[test]
            fn verified_ranges_decode() {
                super::verified_ranges_decode(&$make);
            }
            #[test]
            fn refuses_oversize_and_short_uploads() {
                super::refuses_oversize_and_short_uploads(&$make);
            }
            #[test]
            fn reports_missing_blobs() {
                super::reports_missing_blobs(&$make);
            }
            #[test]
            fn detects_corruption_and_heals_on_re_put() {
                super::detects_corruption_and_heals_on_re_put(&$make);
            }
            #[test]
            fn corruption_is_caught_in_verified_streams() {
                super::corruption_is_caught_in_verified_streams(&$make);
            }
        }
    };
}

suite!(on_disk, disk());
suite!(in_memory, memory());

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_range_reads_back_exactly(size in 0usize..70_000, a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>()) {
        let store = memory();
        let data = bytes(size, size as u64);
        let id = store.put_bytes(&data).expect("put").id;
        let (x, y) = (a.index(size + 1), b.index(size + 1));
        let (start, end) = (x.min(y), x.max(y));
        let mut out = Vec::new();
        store.read_range(&id, start as u64..end as u64, &mut out).expect("range");
        prop_assert_eq!(&out[..], &data[start..end]);
    }
}

#[test]
fn a_flipped_byte_anywhere_in_a_verified_stream_is_refused() {
    // Size prefix, parent hash pairs and chunk groups alike.
    let store = memory();
    let data = bytes(70_000, 21);
    let id = store.put_bytes(&data).expect("put").id;
    let mut encoded = Vec::new();
    store.write_verified(&id, None, &mut encoded).expect("encode");
    for i in (0..encoded.len())
        .step_by(61)
        .chain([0, 7, 8, 71, 72, encoded.len() - 1])
    {
        let mut tampered = encoded.clone();
        tampered[i] ^= 0x10;
        let result = stream::decode(&id, tampered.as_slice(), None, LIMIT, &mut Vec::new());
        assert!(result.is_err(), "flipping byte {i} of {} went unnoticed", encoded.len());
    }
}

#[test]
fn reopening_clears_staged_uploads_and_orphans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = DiskStore::open(dir.path(), LIMIT).expect("open");
    let kept = store.put_bytes(&bytes(20_000, 1)).expect("put").id;
    // What a process killed mid-upload, or between the two renames, leaves behind.
    std::fs::write(dir.path().join("tmp/0123.data"), bytes(1000, 2)).expect("stage");
    let orphan = store.blob_path(&BlobId::of(b"orphan")).with_extension("obao");
    std::fs::create_dir_all(orphan.parent().expect("parent")).expect("mkdir");
    std::fs::write(&orphan, [0u8; 64]).expect("orphan");
    drop(store);
    let store = DiskStore::open(dir.path(), LIMIT).expect("reopen");
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).expect("tmp").count(), 0);
    assert!(!orphan.exists());
    assert_eq!(store.list().expect("list"), vec![kept]);
}

#[test]
fn a_failing_source_leaves_nothing() {
    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "peer went away",
                ));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(7);
            self.0 -= n;
            Ok(n)
        }
    }
    let h = disk();
    let result = h.store.put(&mut Failing(50_000), 100_000);
    assert!(matches!(result, Err(StoreError::Io(_))), "{result:?}");
    assert!(h.store.list().expect("list").is_empty());
    assert_eq!(std::fs::read_dir(h._dir.path().join("tmp")).expect("tmp").count(), 0);
}
