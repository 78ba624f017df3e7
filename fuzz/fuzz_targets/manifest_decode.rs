//! Decoding arbitrary bytes as a manifest never panics, and whatever decodes re-encodes to the
//! exact input (one manifest, one encoding, one id).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vouch_types::{Manifest, ManifestLimits};

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = Manifest::decode(data, &ManifestLimits::default()) {
        assert_eq!(manifest.encode(), data);
    }
});
