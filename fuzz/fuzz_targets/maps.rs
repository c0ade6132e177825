#![no_main]
//! See crates/iovmap-fuzz-targets/src/maps_target.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| iovmap_fuzz_targets::maps(data));
