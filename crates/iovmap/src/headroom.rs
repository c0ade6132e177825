//! Room under vm.max_map_count.
//!
//! Each run of a view is one VMA until the kernel merges it with a neighbour, and
//! `vm.max_map_count` caps the VMAs of the whole process. mmap and mremap fail with
//! ENOMEM a few VMAs before the cap (each placement may split the reservation first:
//! measured here, the 65,500th clone failed from 25 VMAs under the default 65,530, a
//! margin of 6), so iovmap keeps [`MARGIN`] in hand.
//!
//! Counting the process's VMAs means reading /proc/self/maps, ~20 µs for a small process
//! and more for a large one. Views of at least [`CHECK_MIN_RUNS`] runs are checked before
//! anything is placed; smaller views, whose placement costs less than the count, are
//! checked only if a placement fails with ENOMEM, after the rollback. Either way the
//! caller gets [`Error::TooManyMappings`] and no mapping stays behind.

use std::io;

use crate::error::Error;
use crate::{sys, vma};

/// VMAs kept free below vm.max_map_count.
pub(crate) const MARGIN: usize = 8;

/// Views with at least this many runs are checked before placement.
pub(crate) const CHECK_MIN_RUNS: usize = 512;

/// How many more VMAs this process may create.
pub(crate) fn available() -> io::Result<usize> {
    let max = sys::max_map_count()?;
    let now = vma::count_process_vmas()?;
    Ok(max.saturating_sub(now).saturating_sub(MARGIN))
}

/// Refuses a view of `runs` runs that cannot fit.
pub(crate) fn check(runs: usize) -> Result<(), Error> {
    let available = available().map_err(|source| Error::Os { op: "reading /proc/self/maps", index: None, source })?;
    if runs > available {
        return Err(Error::TooManyMappings { needed: runs, available });
    }
    Ok(())
}

/// After a placement failed with ENOMEM and was rolled back: was it the VMA cap?
pub(crate) fn explain_enomem(runs: usize, err: Error) -> Error {
    match available() {
        Ok(available) if runs > available => Error::TooManyMappings { needed: runs, available },
        _ => err,
    }
}
