//! How each run is placed: what is known about cloning its source ([`Clonability`]), and
//! the pure choice made from it ([`strategy`]). `place.rs` runs the choice as a small
//! state machine: it asks [`strategy`], does what it says, feeds back what the kernel
//! answered, and asks again, until the run is placed or nothing can place it.
//!
//! ```text
//!              Unknown ──clone ok──▶ Clones ──▶ placed (cloned)
//!                 │  └──(hole kernel) probe ─┐
//!       clone refused (errno)                ▼
//!                 └─────────────────▶ Refused(errno) ──fd registered──▶ placed (fd / device)
//!                                            └──no fd──▶ error (NoFallback, Sealed)
//! ```

use crate::plan::Run;

/// What is known about cloning a run's source mapping: learned by a clone (or a probe)
/// and kept on its registered region across calls, or for the rest of one call.
///
/// ```
/// use iovmap::plan::Clonability;
/// assert_eq!(Clonability::from_raw(Clonability::Refused(libc::EPERM).to_raw()), Clonability::Refused(libc::EPERM));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clonability {
    /// Nothing yet.
    Unknown,
    /// A clone of it worked.
    Clones,
    /// The kernel refused to clone it, with this errno: EFAULT (VM_PFNMAP / VM_IO /
    /// VM_DONTEXPAND, such as a vfio BAR), EINVAL (hugetlbfs, private memory), EPERM (a
    /// mapping sealed with mseal).
    Refused(i32),
}

impl Clonability {
    /// As one `i32`, for an atomic: 0 unknown, -1 clones, a positive errno refused.
    ///
    /// ```
    /// assert_eq!(iovmap::plan::Clonability::Unknown.to_raw(), 0);
    /// ```
    pub fn to_raw(self) -> i32 {
        match self {
            Clonability::Unknown => 0,
            Clonability::Clones => -1,
            Clonability::Refused(errno) => errno.max(1),
        }
    }

    /// The inverse of [`Clonability::to_raw`].
    ///
    /// ```
    /// assert_eq!(iovmap::plan::Clonability::from_raw(-1), iovmap::plan::Clonability::Clones);
    /// ```
    pub fn from_raw(raw: i32) -> Self {
        match raw {
            0 => Clonability::Unknown,
            r if r < 0 => Clonability::Clones,
            errno => Clonability::Refused(errno),
        }
    }
}

/// Whether an mremap error is the kernel refusing to clone this kind of mapping (EFAULT:
/// VM_PFNMAP/VM_DONTEXPAND or an unmapped source; EINVAL: hugetlbfs or private memory;
/// EPERM: a sealed mapping), rather than a failure of the call (ENOMEM...).
pub(crate) fn is_refusal(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::EFAULT | libc::EINVAL | libc::EPERM))
}

/// How the map path places a run: the step chosen from the run and what is known about
/// its source, with no syscall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Clone it into the reservation; if the kernel refuses, ask again with what it said.
    Clone,
    /// First learn whether its source clones, by a clone to an address the kernel
    /// chooses (kernels that punch holes), then ask again with what was learned.
    Probe,
    /// Map the registered fd at the run's offset.
    Fd,
    /// Nothing can place it: the clone is refused and no fd is registered.
    Fail,
}

/// Chooses how to place `run`, given what is known about cloning its source and whether
/// this kernel punches a hole at the destination of a refused clone.
///
/// ```
/// use iovmap::plan::{plan, strategy, Clonability, Strategy, Vma};
/// let rw = libc::PROT_READ | libc::PROT_WRITE;
/// let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: rw, shared: true, page_size: 0x1000, ..Default::default() }];
/// let run = plan(&[libc::iovec { iov_base: 0x10000 as *mut _, iov_len: 0x1000 }], &mut vmas[..], &[], 0x1000)?.runs[0];
/// assert_eq!(strategy(&run, Clonability::Unknown, false), Strategy::Clone);
/// assert_eq!(strategy(&run, Clonability::Unknown, true), Strategy::Probe);
/// assert_eq!(strategy(&run, Clonability::Refused(libc::EFAULT), false), Strategy::Fail); // not registered
/// # Ok::<(), iovmap::Error>(())
/// ```
pub fn strategy(run: &Run, known: Clonability, kernel_punches_holes: bool) -> Strategy {
    let fallback = if run.fd().is_some() { Strategy::Fd } else { Strategy::Fail };
    if !run.clonable() {
        return fallback;
    }
    match known {
        Clonability::Refused(_) => fallback,
        Clonability::Clones => Strategy::Clone,
        Clonability::Unknown if kernel_punches_holes => Strategy::Probe,
        Clonability::Unknown => Strategy::Clone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{FdSource, plan};
    use crate::regions::RegionSpan;
    use crate::vma::Vma;

    const P: usize = 0x1000;

    fn shared(start: usize, end: usize) -> Vma {
        Vma { start, end, prot: libc::PROT_READ | libc::PROT_WRITE, shared: true, page_size: P, ..Default::default() }
    }

    fn first_run(list: &[libc::iovec], vmas: &[Vma], regions: &[RegionSpan]) -> Run {
        plan(list, &mut vmas.to_vec()[..], regions, P).unwrap().runs[0]
    }

    #[test]
    fn strategies_follow_what_is_known() {
        let iov = |a: usize, l: usize| libc::iovec { iov_base: a as *mut libc::c_void, iov_len: l };
        // One file mapped in two VMAs (say the VMM mprotected half of it), registered whole.
        let vmas = [shared(0x10000, 0x14000), Vma { offset: 0x4000, ..shared(0x14000, 0x18000) }];
        let regions = [RegionSpan { start: 0x10000, end: 0x18000, page_size: P, ..RegionSpan::default() }];
        let registered_crossing = first_run(&[iov(0x13000, 2 * P)], &vmas, &regions);
        assert_eq!(registered_crossing.fd(), Some(FdSource { region: 0, offset: 0x3000 }));
        let registered = first_run(&[iov(0x11000, P)], &vmas, &regions);
        let plain = first_run(&[iov(0x11000, P)], &vmas, &[]);
        use Clonability::*;
        for holes in [false, true] {
            for c in [Unknown, Clones, Refused(libc::EFAULT)] {
                assert_eq!(strategy(&registered_crossing, c, holes), Strategy::Fd, "a run across VMAs is never cloned");
            }
            for errno in [libc::EFAULT, libc::EINVAL, libc::EPERM] {
                assert_eq!(strategy(&registered, Refused(errno), holes), Strategy::Fd);
                assert_eq!(strategy(&plain, Refused(errno), holes), Strategy::Fail);
            }
            assert_eq!(strategy(&plain, Clones, holes), Strategy::Clone);
        }
        assert_eq!(strategy(&plain, Unknown, false), Strategy::Clone);
        assert_eq!(strategy(&plain, Unknown, true), Strategy::Probe);
    }

    #[test]
    fn raw_round_trips_and_refusals_are_told_from_failures() {
        for c in [Clonability::Unknown, Clonability::Clones, Clonability::Refused(libc::EINVAL)] {
            assert_eq!(Clonability::from_raw(c.to_raw()), c);
        }
        assert!(is_refusal(Some(libc::EPERM)) && is_refusal(Some(libc::EFAULT)) && is_refusal(Some(libc::EINVAL)));
        assert!(!is_refusal(Some(libc::ENOMEM)) && !is_refusal(None));
    }
}
