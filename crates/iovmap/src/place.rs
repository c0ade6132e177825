//! The mapping loop: turns a [`Plan`] into a [`View`].
//!
//! 1. Check the room under vm.max_map_count (large views; see `headroom`).
//! 2. Reserve the view's range, aligned for its largest page size.
//! 3. Place each run: clone it with mremap; if the kernel refuses (EFAULT for
//!    VM_PFNMAP/VM_DONTEXPAND such as vfio BARs, EINVAL for hugetlbfs), map the registered
//!    fd at the run's offset instead, and remember the refusal on the region so its later
//!    runs (in this call and later ones) go to the fd directly. Runs that cross VMAs go to
//!    the fd directly.
//! 4. Check every clone of more than one page: a clone is not bounded by the VMA at its
//!    source, so one that met a shorter mapping (another thread replaced the source under
//!    the call) shows pages never mapped there. The clone's VMA says which file and offset
//!    it maps; if that is not the source the plan saw, the view is not built
//!    (`SourceChanged`).
//! 5. mprotect the view when a clone inherited a protection other than the one asked for.
//! 6. Prefault the RAM runs if asked.
//!
//! Any error drops the reservation, which unmaps everything placed so far.
//!
//! On kernels that punch a hole at the destination of a refused clone (Linux before
//! 6.17, see `holes.rs`), step 3 never clones into the reservation unless the source is
//! known to clone: registered regions learn it when registered, other mappings once per
//! call and VMA, each by a clone to an address the kernel chooses. A clone that fails
//! anyway (the source changed under the call) may have left a hole: the reservation is
//! marked so that the kernel's VMA at the destination says whether it did. A hole is
//! refilled with MAP_FIXED_NOREPLACE, and the rollback leaves it alone.

use std::collections::BTreeMap;
use std::io;

use crate::error::Error;
use crate::headroom;
use crate::holes::{self, is_refusal, probe_clone};
use crate::options::MapOptions;
use crate::plan::{Clonability, Plan, Run, Strategy, strategy};
use crate::regions::{CloneState, Region, Regions};
use crate::reservation::Reservation;
use crate::sys;
use crate::view::{MapStats, View};
use crate::vma;

/// Builds the view `plan` describes.
pub(crate) fn build(plan: &Plan, regions: &Regions, opts: &MapOptions) -> Result<View, Error> {
    let runs = plan.runs.len();
    headroom::check(runs)?;
    let holes = holes::kernel_punches_holes();
    let reservation = Reservation::new(plan.map_len, plan.align, holes).map_err(|source| Error::Os {
        op: "mmap (reservation)",
        index: None,
        source,
    })?;
    let mut placer = Placer {
        reservation,
        regions,
        prot: opts.access.prot(),
        holes,
        probed: BTreeMap::new(),
        to_check: Vec::new(),
        stats: MapStats { segments: plan.segments, runs, ..MapStats::default() },
    };
    match placer.fill(plan, opts) {
        Ok(()) => Ok(View::new(placer.reservation.into_raw(), plan.lead, plan.len, placer.stats)),
        Err(err) => {
            drop(placer);
            if is_enomem(&err) { Err(headroom::explain_enomem(runs, err)) } else { Err(err) }
        }
    }
}

fn is_enomem(err: &Error) -> bool {
    matches!(err, Error::Os { source, .. } if source.raw_os_error() == Some(libc::ENOMEM))
}

fn region_of<'r>(run: &Run, regions: &'r Regions) -> Option<&'r Region> {
    run.fd().map(|fd| regions.get(fd.region))
}

/// The state of one map call.
struct Placer<'r> {
    reservation: Reservation,
    regions: &'r Regions,
    prot: i32,
    /// Whether this kernel punches a hole at the destination of a refused clone.
    holes: bool,
    /// On such kernels: what a clone of each source VMA (by the plan's VMA index) gave.
    probed: BTreeMap<usize, Result<(), i32>>,
    /// Runs (by index in the plan) placed by a clone of more than one page.
    to_check: Vec<usize>,
    stats: MapStats,
}

impl Placer<'_> {
    /// Places every run, then fixes protection and prefaults.
    fn fill(&mut self, plan: &Plan, opts: &MapOptions) -> Result<(), Error> {
        let base = self.reservation.base();
        let mut reprotect = false;
        let page = sys::page_size();
        for (i, run) in plan.runs.iter().enumerate() {
            debug_assert!(run.dst() + run.len() <= self.reservation.len());
            let cloned = self.place(run, base + run.dst())?;
            // A clone of one page cannot run past its source: every VMA holds whole pages.
            if cloned && run.len() > page {
                self.to_check.push(i);
            }
            reprotect |= cloned && run.prot() != self.prot;
        }
        self.check_clones(plan, base)?;
        if reprotect {
            protect(base, self.reservation.len(), plan, self.prot)?;
        }
        if opts.populate {
            populate(base, plan, self.regions, self.prot & libc::PROT_WRITE != 0)?;
        }
        Ok(())
    }

    /// Checks that every clone of more than one page maps the file and offset the plan saw
    /// at its source (one VMA query each, answered by the kernel: nothing cached).
    ///
    /// A clone copies `len` bytes of whatever mapping is at its source when it runs; if
    /// another thread had mapped something shorter there, the clone went on into that
    /// mapping's file: pages never mapped at the address, or past the file's end. The
    /// clone's own VMA records which file and offset it maps, whatever happened to the
    /// source since, so this catches it even if the source was put back before the check.
    /// (A source replaced by a mapping of the same file at the same offset shows the same
    /// bytes; one replaced by another mapping covering the whole run shows that mapping,
    /// which was mapped there during the call.)
    fn check_clones(&self, plan: &Plan, base: usize) -> Result<(), Error> {
        if self.to_check.is_empty() {
            return Ok(());
        }
        let dsts: Vec<usize> = self.to_check.iter().map(|&i| base + plan.runs[i].dst()).collect();
        let index = Some(plan.runs[self.to_check[0]].first());
        let seen = vma::vmas_now(&dsts).map_err(|source| Error::Os { op: "VMA lookup", index, source })?;
        for (k, (&dst, seen)) in dsts.iter().zip(seen).enumerate() {
            let run = &plan.runs[self.to_check[k]];
            let planned = plan.vmas[run.vma()];
            let want = planned.offset + (run.src() - planned.start) as u64;
            let same = seen.is_some_and(|v| v.file == planned.file && v.offset + (dst - v.start) as u64 == want);
            if !same {
                log::debug!("iovmap: the clone of {:#x}+{:#x} maps {seen:?}, not {planned:?}", run.src(), run.len());
                return Err(Error::SourceChanged { index: run.first() });
            }
        }
        Ok(())
    }

    /// Places one run at `dst`. Returns whether it was cloned (true) or fd-mapped (false).
    fn place(&mut self, run: &Run, dst: usize) -> Result<bool, Error> {
        let region = region_of(run, self.regions);
        // What is known about cloning the source: learned by its region (across calls) or
        // by this call's probe of its VMA; with the kernel's answer when it refused.
        let learned = match region.map(Region::clone_state) {
            Some(CloneState::Clones) => Some(Ok(())),
            Some(CloneState::Refused(errno)) => Some(Err(errno)),
            _ => self.probed.get(&run.vma()).copied(),
        };
        let known = match learned {
            None => Clonability::Unknown,
            Some(Ok(())) => Clonability::Clones,
            Some(Err(_)) => Clonability::Refused,
        };
        let mut refusal = learned.and_then(Result::err).map(io::Error::from_raw_os_error);
        let mut step = strategy(run, known, self.holes);
        if step == Strategy::Probe {
            let learned = self.probe(run, region)?;
            if let Err(errno) = learned {
                refusal = Some(io::Error::from_raw_os_error(errno));
            }
            step = strategy(run, if learned.is_ok() { Clonability::Clones } else { Clonability::Refused }, self.holes);
        }
        if step == Strategy::Clone {
            match self.clone_into(run, dst, region, known)? {
                None => return Ok(true),
                Some(e) => {
                    refusal = Some(e);
                    step = strategy(run, Clonability::Refused, self.holes);
                }
            }
        }
        let (Strategy::Fd, Some(fd), Some(region_fd)) = (step, run.fd(), region.and_then(Region::fd)) else {
            let source = refusal.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL));
            return Err(Error::NoFallback { index: run.first(), source });
        };
        self.stats.syscalls += 1;
        let placed = if self.reservation.is_hole(dst) {
            // The kernel may have unmapped `dst` and another thread may have mapped
            // something there since: map only if the range is still free.
            sys::map_fd_noreplace(dst, run.len(), self.prot, region_fd, fd.offset)
                .inspect(|()| self.reservation.fill_hole(dst))
        } else {
            // SAFETY: `[dst, dst + run.len())` lies in the reservation (the plan keeps every
            // run inside `map_len`), which the map path owns until it is a view.
            unsafe { sys::map_fd_fixed(dst, run.len(), self.prot, region_fd, fd.offset) }
        };
        placed.map_err(|e| match e.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) if self.prot & libc::PROT_WRITE != 0 => {
                Error::NotWritable { index: run.first() }
            }
            Some(libc::ENOMEM) => Error::Os { op: "mmap", index: Some(run.first()), source: e },
            Some(libc::EEXIST) => Error::Os {
                op: "mmap (MAP_FIXED_NOREPLACE) into the range of a refused clone, which another thread mapped meanwhile",
                index: Some(run.first()),
                source: e,
            },
            _ => Error::NoFallback { index: run.first(), source: e },
        })?;
        self.stats.fd_mapped += 1;
        Ok(false)
    }

    /// Clones `run` into `dst`. `Ok(None)`: placed. `Ok(Some(e))`: the kernel refused,
    /// and the run may still be placed from an fd.
    fn clone_into(
        &mut self,
        run: &Run,
        dst: usize,
        region: Option<&Region>,
        known: Clonability,
    ) -> Result<Option<io::Error>, Error> {
        self.stats.syscalls += 1;
        // SAFETY: `[dst, dst + run.len())` lies in the reservation (the plan keeps every run
        // inside `map_len`), which the map path owns until it is a view.
        match unsafe { sys::clone_fixed(run.src(), run.len(), dst) } {
            Ok(()) => {
                self.stats.cloned += 1;
                if let Some(r) = region.filter(|_| known == Clonability::Unknown) {
                    r.learn(Ok(()));
                }
                Ok(None)
            }
            Err(e) => {
                if !is_refusal(&e) {
                    // ENOMEM (the VMA cap) and the like come before the unmap on every
                    // kernel: the destination is still ours.
                    return Err(Error::Os { op: "mremap", index: Some(run.first()), source: e });
                }
                if self.holes {
                    // Known to clone, yet refused: the source changed under us. On this
                    // kernel the destination may be gone (refused for its kind) or not
                    // (refused because nothing was mapped there), and if gone, may be
                    // someone else's by now. Until the kernel says, it is a hole; if the
                    // lookup fails, it stays one (better a PROT_NONE range left behind
                    // than another thread's mapping unmapped).
                    self.reservation.mark_hole(dst, run.len());
                    let ours = self.reservation.still_holds(dst).map_err(|source| Error::Os {
                        op: "VMA lookup (after a refused clone)",
                        index: Some(run.first()),
                        source,
                    })?;
                    if ours {
                        self.reservation.fill_hole(dst);
                    }
                }
                log::debug!(
                    "iovmap: clone of {:#x}+{:#x} refused ({e}); using the registered fd",
                    run.src(),
                    run.len()
                );
                if let Some(r) = region {
                    r.learn(Err(e.raw_os_error().unwrap_or(libc::EINVAL)));
                }
                Ok(Some(e))
            }
        }
    }

    /// On kernels that punch holes: whether the run's source VMA clones, learned once per
    /// call by a clone to an address the kernel chooses, never into the reservation.
    fn probe(&mut self, run: &Run, region: Option<&Region>) -> Result<Result<(), i32>, Error> {
        if let Some(known) = self.probed.get(&run.vma()) {
            return Ok(*known);
        }
        self.stats.syscalls += 1;
        let clones = probe_clone(run.src(), run.page_size()).map_err(|source| Error::Os {
            op: "mremap (clone probe)",
            index: Some(run.first()),
            source,
        })?;
        self.probed.insert(run.vma(), clones);
        if let Some(r) = region {
            r.learn(clones);
        }
        Ok(clones)
    }
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
        if let Err(e) = unsafe { sys::protect(base + run.dst(), run.len(), prot) } {
            return Err(match e.raw_os_error() {
                Some(libc::EACCES) if prot & libc::PROT_WRITE != 0 => Error::NotWritable { index: run.first() },
                _ => Error::Os { op: "mprotect", index: Some(run.first()), source: e },
            });
        }
    }
    Err(Error::Os { op: "mprotect", index: None, source: err })
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
            Some((start, end, index)) if end == run.dst() => Some((start, run.dst() + run.len(), index)),
            other => {
                flush(other)?;
                Some((run.dst(), run.dst() + run.len(), run.first()))
            }
        };
    }
    flush(stretch)
}
