//! Room under vm.max_map_count.
//!
//! Each run of a view is one VMA until the kernel merges it with a neighbour, and
//! `vm.max_map_count` caps the VMAs of the whole process. mmap and mremap fail with
//! ENOMEM a few VMAs before the cap (each placement may split the reservation first:
//! measured here, the 65,500th clone failed from 25 VMAs under the default 65,530, a
//! margin of 6), so iovmap keeps [`MARGIN`] in hand.
//!
//! Counting the process's VMAs means reading /proc/self/maps: ~0.25 µs per VMA here
//! (37 µs at 100 VMAs, 2.5 ms at 10,000, 17 ms at 50,000), which for a VMM with many
//! mappings can cost more than placing a view. So the count is made up front only where
//! it can matter: for views of at least [`CHECK_MIN_RUNS`] runs, and only when the runs
//! plus the VMAs counted last time (plus [`SLACK`] for what the process may have mapped
//! since) could reach the cap. Everywhere else a placement that does hit the cap fails
//! with ENOMEM, is rolled back, and is then counted and reported the same way. Either way
//! the caller gets [`Error::TooManyMappings`] and no mapping stays behind.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Operation};
use crate::{sys, vma};

/// VMAs kept free below vm.max_map_count.
pub(crate) const MARGIN: usize = 8;

/// Views with fewer runs are never counted up front (placing them costs less than a
/// count: ~3 µs a run against ~0.25 µs per VMA of the process).
pub(crate) const CHECK_MIN_RUNS: usize = 512;

/// VMAs the process may have gained since the last count before a view is counted again.
pub(crate) const SLACK: usize = 8192;

/// The process's VMA count and vm.max_map_count as last read (0: never).
static LAST_COUNT: AtomicUsize = AtomicUsize::new(0);
static LAST_MAX: AtomicUsize = AtomicUsize::new(0);

/// How many more VMAs this process may create (and remember what was read).
pub(crate) fn available() -> io::Result<usize> {
    let max = sys::max_map_count()?;
    let now = vma::count_process_vmas()?;
    LAST_MAX.store(max, Ordering::Relaxed);
    LAST_COUNT.store(now, Ordering::Relaxed);
    Ok(max.saturating_sub(now).saturating_sub(MARGIN))
}

/// Whether a view of `runs` runs is worth counting before placement.
fn worth_counting(runs: usize) -> bool {
    if runs < CHECK_MIN_RUNS {
        return false;
    }
    let (count, max) = (LAST_COUNT.load(Ordering::Relaxed), LAST_MAX.load(Ordering::Relaxed));
    count == 0 || runs + count + SLACK + MARGIN >= max
}

/// Refuses, before anything is placed, a view of `runs` runs that cannot fit.
pub(crate) fn check(runs: usize) -> Result<(), Error> {
    if !worth_counting(runs) {
        return Ok(());
    }
    let available = available().map_err(|source| Error::Os { op: Operation::VmaCount, index: None, source })?;
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
