#![no_main]
//! See crates/iovmap-fuzz-targets/src/plan_target.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| iovmap_fuzz_targets::plan(data));
