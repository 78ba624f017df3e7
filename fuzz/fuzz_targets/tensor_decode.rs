//! Every tensor decoder (`.npy`, `.npz`, `TensorProto`, JSON) refuses arbitrary bytes with an
//! error, never a panic, and never allocates past its limits. The first byte picks the decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vouch_tensor::{TensorFormat, TensorLimits};

fuzz_target!(|data: &[u8]| {
    let Some((selector, bytes)) = data.split_first() else {
        return;
    };
    let format = match selector % 4 {
        0 => TensorFormat::Npy,
        1 => TensorFormat::Npz,
        2 => TensorFormat::TensorProto,
        _ => TensorFormat::Json,
    };
    let limits = TensorLimits {
        max_elements: 1 << 20,
        max_total_elements: 1 << 20,
        ..TensorLimits::default()
    };
    let _ = format.decode(bytes, &limits);
});
