//! Receipt bytes and receipt JSON from anyone: decoding never panics, and whatever decodes
//! re-encodes to the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vouch_types::Receipt;

fuzz_target!(|data: &[u8]| {
    if let Ok(receipt) = Receipt::decode(data) {
        assert_eq!(receipt.encode(), data);
    }
    if let Ok(receipt) = serde_json::from_slice::<Receipt>(data) {
        let _ = receipt.check_signature();
    }
});
