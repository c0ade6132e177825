//! The bodies of iovmap's fuzz targets, shared by cargo-fuzz (`fuzz/fuzz_targets/*.rs`,
//! nightly) and by the stable-toolchain replay of the committed corpora
//! (`tests/replay.rs`, `tests/replay_view.rs`). Each target decodes its input with
//! `arbitrary` and panics when an invariant breaks; `docs/fuzzing.md` says what each one
//! checks and how the reference model works.

//! The view target needs iovmap's fault injection: it is built with this crate's
//! `fault-injection` feature only (its tests and fuzz/ enable it).

#[cfg(feature = "fault-injection")]
pub mod fixtures;
pub mod maps_target;
pub mod model;
pub mod plan_target;
pub mod run;
#[cfg(feature = "fault-injection")]
pub mod view_target;

pub use maps_target::maps;

use std::path::PathBuf;

/// The folder holding the committed corpora and regressions (`corpus/<target>`,
/// `regressions/<target>`): `$IOVMAP_FUZZ_DIR` where set (the guest test copies them to
/// a fixed place, since the path of the build may not exist there), the repository's
/// `fuzz/` otherwise.
///
/// ```
/// assert!(iovmap_fuzz_targets::fuzz_dir().ends_with("fuzz") || std::env::var_os("IOVMAP_FUZZ_DIR").is_some());
/// ```
pub fn fuzz_dir() -> PathBuf {
    match std::env::var_os("IOVMAP_FUZZ_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz")),
    }
}
pub use plan_target::plan;
#[cfg(feature = "fault-injection")]
pub use view_target::view;
