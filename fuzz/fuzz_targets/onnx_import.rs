//! Importing arbitrary bytes as an ONNX model, and turning whatever loads into Vouch's IR, returns
//! an error instead of panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(model) = vouch_engine::load_onnx(data) {
        let _ = model.to_ir();
    }
});
