//! The mapping loop: turns a [`Plan`] into a [`View`].
//!
//! 1. Check the room under vm.max_map_count (large views; see `headroom`).
//! 2. Reserve the view's range, aligned for its largest page size.
//! 3. Place each run: clone it with mremap; if the kernel refuses (EFAULT for
//!    VM_PFNMAP/VM_DONTEXPAND such as vfio BARs, EINVAL for hugetlbfs), map the registered
//!    fd at the run's offset instead, and remember the refusal on the region so its later
//!    runs (in this call and later ones) go to the fd directly. Runs that cross VMAs go to
//!    the fd directly.
//! 4. mprotect the view when a clone inherited a protection other than the one asked for.
//! 5. Prefault the RAM runs if asked.
//!
//! Any error drops the reservation, which unmaps everything placed so far.

use std::io;

use crate::error::Error;
use crate::headroom;
use crate::options::MapOptions;
use crate::plan::{Plan, Run};
use crate::regions::{CloneState, Region, Regions};
use crate::reservation::Reservation;
use crate::sys;
use crate::view::{MapStats, View};

/// Builds the view `plan` describes.
pub(crate) fn build(plan: &Plan, regions: &Regions, opts: &MapOptions) -> Result<View, Error> {
    let runs = plan.runs.len();
    if runs >= headroom::CHECK_MIN_RUNS {
        headroom::check(runs)?;
    }
    let reservation = Reservation::new(plan.map_len, plan.align).map_err(|source| Error::Os {
        op: "mmap (reservation)",
        index: None,
        source,
    })?;
    let mut stats = MapStats { segments: plan.segments, runs, ..MapStats::default() };
    match fill(&reservation, plan, regions, opts, &mut stats) {
        Ok(()) => Ok(View::new(reservation.into_raw(), plan.lead, plan.len, stats)),
        Err(err) => {
            drop(reservation);
            if is_enomem(&err) { Err(headroom::explain_enomem(runs, err)) } else { Err(err) }
        }
    }
}

fn is_enomem(err: &Error) -> bool {
    matches!(err, Error::Os { source, .. } if source.raw_os_error() == Some(libc::ENOMEM))
}

/// Places every run, then fixes protection and prefaults.
fn fill(
    reservation: &Reservation,
    plan: &Plan,
    regions: &Regions,
    opts: &MapOptions,
    stats: &mut MapStats,
) -> Result<(), Error> {
    let base = reservation.base();
    let prot = opts.access.prot();
    let mut reprotect = false;
    for run in &plan.runs {
        debug_assert!(run.dst + run.len <= reservation.len());
        let cloned = place(run, base + run.dst, regions, prot, stats)?;
        reprotect |= cloned && run.prot != prot;
    }
    if reprotect {
        protect(base, reservation.len(), plan, prot)?;
    }
    if opts.populate {
        populate(base, plan, regions, prot & libc::PROT_WRITE != 0)?;
    }
    Ok(())
}

/// Whether an mremap error is the kernel refusing to clone this kind of mapping.
fn is_refusal(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EFAULT | libc::EINVAL))
}

fn region_of<'r>(run: &Run, regions: &'r Regions) -> Option<&'r Region> {
    run.fd.map(|fd| regions.get(fd.region))
}

/// Places one run at `dst`. Returns whether it was cloned (true) or fd-mapped (false).
fn place(run: &Run, dst: usize, regions: &Regions, prot: i32, stats: &mut MapStats) -> Result<bool, Error> {
    let region = region_of(run, regions);
    let known_refused = region.is_some_and(|r| r.clone_state() != CloneState::Try);
    if run.clone && !known_refused {
        stats.syscalls += 1;
        // SAFETY: `[dst, dst + run.len)` lies in the reservation `fill` was given (the plan
        // keeps every run inside `map_len`), which the map path owns until it is a view.
        match unsafe { sys::clone_fixed(run.src, run.len, dst) } {
            Ok(()) => {
                stats.cloned += 1;
                return Ok(true);
            }
            Err(e) if is_refusal(&e) => match region {
                Some(r) => {
                    log::debug!(
                        "iovmap: clone of {:#x}+{:#x} refused ({e}); using the registered fd from now on",
                        run.src,
                        run.len
                    );
                    r.mark_refused(e.raw_os_error().unwrap_or(libc::EINVAL));
                }
                None => return Err(Error::NoFallback { index: run.first, source: e }),
            },
            Err(source) => return Err(Error::Os { op: "mremap", index: Some(run.first), source }),
        }
    }
    let (Some(fd), Some(region_fd)) = (run.fd, region.and_then(Region::fd)) else {
        // The planner gives every run a clone or an fd; a run with neither cannot be placed.
        return Err(Error::NoFallback { index: run.first, source: io::Error::from_raw_os_error(libc::EINVAL) });
    };
    stats.syscalls += 1;
    // SAFETY: as for the clone above.
    unsafe { sys::map_fd_fixed(dst, run.len, prot, region_fd, fd.offset) }.map_err(|e| match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) if prot & libc::PROT_WRITE != 0 => Error::NotWritable { index: run.first },
        Some(libc::ENOMEM) => Error::Os { op: "mmap", index: Some(run.first), source: e },
        _ => Error::NoFallback { index: run.first, source: e },
    })?;
    stats.fd_mapped += 1;
    Ok(false)
}

/// Gives the whole view the protection asked for. A clone inherits its source's
/// protection; raising it to writable fails (EACCES) where the file was opened read-only
/// or is write-sealed, and then the run at fault is named.
fn protect(base: usize, len: usize, plan: &Plan, prot: i32) -> Result<(), Error> {
    // SAFETY: the range is the reservation being filled, owned by the map path.
    let Err(err) = (unsafe { sys::protect(base, len, prot) }) else { return Ok(()) };
    // Find the run that refuses, to name its segment.
    for run in &plan.runs {
        // SAFETY: one run of the same reservation.
        if let Err(e) = unsafe { sys::protect(base + run.dst, run.len, prot) } {
            return Err(protect_error(run, prot, e));
        }
    }
    Err(Error::Os { op: "mprotect", index: None, source: err })
}

fn protect_error(run: &Run, prot: i32, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::EACCES) if prot & libc::PROT_WRITE != 0 => Error::NotWritable { index: run.first },
        _ => Error::Os { op: "mprotect", index: Some(run.first), source: e },
    }
}

/// Whether a run is device memory (VM_PFNMAP/VM_IO), which cannot be prefaulted: its
/// region's clone was refused with EFAULT, the answer for such mappings.
fn is_device(run: &Run, regions: &Regions) -> bool {
    region_of(run, regions).is_some_and(|r| r.clone_state() == CloneState::Refused(libc::EFAULT))
}

/// Prefaults the RAM runs, one madvise per stretch of adjacent RAM runs.
fn populate(base: usize, plan: &Plan, regions: &Regions, write: bool) -> Result<(), Error> {
    let op = if write { "madvise(MADV_POPULATE_WRITE)" } else { "madvise(MADV_POPULATE_READ)" };
    let mut stretch: Option<(usize, usize, usize)> = None; // (start, end, first segment)
    let flush =
        |s: Option<(usize, usize, usize)>| -> Result<(), Error> {
            match s {
                Some((start, end, index)) => sys::populate(base + start, end - start, write)
                    .map_err(|source| Error::Os { op, index: Some(index), source }),
                None => Ok(()),
            }
        };
    for run in &plan.runs {
        if is_device(run, regions) {
            flush(stretch.take())?;
            continue;
        }
        stretch = match stretch {
            Some((start, end, index)) if end == run.dst => Some((start, run.dst + run.len, index)),
            other => {
                flush(other)?;
                Some((run.dst, run.dst + run.len, run.first))
            }
        };
    }
    flush(stretch)
}
