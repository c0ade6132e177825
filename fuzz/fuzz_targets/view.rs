#![no_main]
//! See crates/iovmap-fuzz-targets/src/view_target.rs. Counts the process's VMAs and fds:
//! run it with `-s none` (run.sh does), so that no sanitizer allocator maps memory of its
//! own behind the count, and with one job.
libfuzzer_sys::fuzz_target!(|data: &[u8]| iovmap_fuzz_targets::view(data));
