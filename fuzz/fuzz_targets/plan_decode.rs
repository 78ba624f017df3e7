//! Decoding arbitrary bytes as an exact plan never panics, and whatever decodes re-encodes to the
//! exact input (one plan, one encoding, one plan id).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vouch_engine::{Plan, PlanLimits};

fuzz_target!(|data: &[u8]| {
    if let Ok(plan) = Plan::decode(data, &PlanLimits::default()) {
        assert_eq!(plan.encode(), data);
    }
});
