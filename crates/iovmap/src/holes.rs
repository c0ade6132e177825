//! Kernels that punch holes.
//!
//! Before Linux 6.17, `mremap(src, old, new, MREMAP_FIXED | MREMAP_MAYMOVE, dst)` unmaps
//! `dst` *before* it checks the source, so a refused clone (EFAULT for VM_PFNMAP /
//! VM_DONTEXPAND such as a vfio BAR, EINVAL for private memory) leaves a hole in the
//! reservation. Another thread's `mmap(NULL)` may land in it; a fallback with MAP_FIXED
//! would then overwrite that mapping, and a rollback that unmaps the whole view range
//! would unmap it. 6.17 moved the checks before the unmap.
//!
//! [`kernel_punches_holes`] finds out once per process which kind of kernel this is, by
//! measurement rather than by version (distributions backport), on the calling thread
//! the first time it is needed: never on a thread of iovmap's own, which a VMM's
//! per-thread seccomp filter or thread accounting would not expect. Fault injection
//! (tests only) stands aside while it runs (`fault::unobserved`), so it never meets a
//! failure meant for the map path. On such kernels the map path never issues a clone
//! into its reservation that the kernel may refuse (see `place.rs`); elsewhere it does
//! exactly what it does on 6.18.

use std::io;
use std::os::fd::AsFd;
use std::sync::OnceLock;

use crate::error::Operation;
use crate::regions::{FileId, RegionSpan, RegionState};
use crate::strategy::{Clonability, is_refusal};
use crate::{sys, vma};

static PUNCHES: OnceLock<bool> = OnceLock::new();

/// Whether a refused `MREMAP_FIXED` unmaps its destination on this kernel (or, in tests,
/// on the kernel the calling thread emulates: `fault::Faults::assume_holes`).
///
/// ```
/// # #[cfg(feature = "unstable-internals")]
/// let _on_this_kernel = iovmap::kernel_punches_holes();
/// ```
pub fn kernel_punches_holes() -> bool {
    #[cfg(feature = "fault-injection")]
    if let Some(assumed) = crate::fault::assumed_holes() {
        return assumed;
    }
    *PUNCHES.get_or_init(|| {
        #[cfg(feature = "fault-injection")]
        let measured = crate::fault::unobserved(probe);
        #[cfg(not(feature = "fault-injection"))]
        let measured = probe();
        let punches = measured.unwrap_or_else(|e| {
            log::warn!("iovmap: cannot tell whether this kernel punches holes ({e}); assuming it does");
            true
        });
        log::debug!("iovmap: a refused MREMAP_FIXED {} its destination", if punches { "unmaps" } else { "keeps" });
        punches
    })
}

/// Whether `[src, src + len)` can be cloned, learned by cloning it to an address the
/// kernel chooses (and unmapping the clone): no range iovmap owns is touched, so a
/// refusal cannot punch a hole. `Ok(Refused(errno))` is a refusal.
pub(crate) fn probe_clone(src: usize, len: usize) -> io::Result<Clonability> {
    match sys::clone_anywhere(src, len, Operation::CloneProbe) {
        Ok(tmp) => {
            // SAFETY: `tmp` is the clone the kernel just made for this probe; nothing else
            // knows its address.
            unsafe { sys::unmap(tmp, len)? };
            Ok(Clonability::Clones)
        }
        Err(e) if is_refusal(e.raw_os_error()) => Ok(Clonability::Refused(e.raw_os_error().unwrap_or(libc::EINVAL))),
        Err(e) => Err(e),
    }
}

/// On kernels that punch holes, learns at registration whether the region's mapping
/// clones, so that no map call ever has to find out by a clone into its reservation.
pub(crate) fn learn_at_registration(span: &RegionSpan, state: &RegionState) {
    if !span.mappable || !kernel_punches_holes() {
        return;
    }
    match probe_clone(span.start, span.page_size) {
        Ok(known) => state.learn(known),
        Err(e) => log::debug!("iovmap: clone probe of {:#x} failed ({e}); learning at map time", span.start),
    }
}

/// Makes the kernel refuse a move into a destination that is unmistakably ours, then
/// looks whether the destination is still there.
///
/// The destination is a mapping of a private memfd at file offset 2 pages: nothing else
/// in the process can map that file, so if /proc/self/maps shows that file at that
/// offset at `dst` afterwards, the kernel kept it; otherwise it unmapped it (and another
/// thread may have mapped something there since, which is why the probe never unmaps a
/// destination it cannot identify).
///
/// The source is a 2-page mapping of the same file split into two VMAs (the second page
/// mprotected), moved whole. Linux before 6.17 refuses a move across VMAs (EFAULT) after
/// unmapping the destination. 6.17 and later check before they unmap, and may instead
/// move both VMAs (multi-VMA moves came with the same rework): then our own pages land on
/// our own destination. Either way only the probe's own mappings are touched, unlike a
/// move whose old range runs into whatever follows it, and nothing is logged, unlike a
/// refused clone of private memory (which the kernel reports once per boot).
fn probe() -> io::Result<bool> {
    let page = sys::page_size();
    let file = sys::memfd(c"iovmap-hole-probe")?;
    sys::truncate(file.as_fd(), 4 * page as u64)?;
    let src = sys::map_shared(2 * page, libc::PROT_READ, file.as_fd(), 0)?;
    // SAFETY: the second page of the mapping made just above (`src.add(page)` stays in
    // it); splitting it off changes nothing anyone else uses.
    if let Err(e) = unsafe { sys::protect(src.add(page), page, libc::PROT_NONE) } {
        // SAFETY: ours, unused.
        unsafe { sys::unmap(src, 2 * page)? };
        return Err(e);
    }
    let dst = match sys::map_shared(2 * page, libc::PROT_READ, file.as_fd(), 2 * page as u64) {
        Ok(d) => d,
        Err(e) => {
            // SAFETY: ours, unused.
            unsafe { sys::unmap(src, 2 * page)? };
            return Err(e);
        }
    };
    // SAFETY: both ranges are exactly the two mappings made above, which nothing else
    // uses; whatever the kernel does, it does to them.
    let moved = unsafe { sys::move_fixed(src, 2 * page, 2 * page, dst) }.is_ok();
    let info = sys::file_info(file.as_fd())?;
    let ours = FileId::from_stat(info.dev, info.ino);
    let at = dst.as_ptr() as usize;
    let seen = vma::vmas_now(&[at])?.pop().flatten();
    let kept = seen.is_some_and(|v| v.start == at && v.file == ours && v.offset == 2 * page as u64);
    // SAFETY: after a move, `dst` holds our source pages and `src` is free (not ours any
    // more: left alone); after a refusal, `src` is still ours, and `dst` is unmapped only
    // when /proc/self/maps shows our file there.
    unsafe {
        if moved {
            sys::unmap(dst, 2 * page)?;
        } else {
            sys::unmap(src, 2 * page)?;
            if kept {
                sys::unmap(dst, 2 * page)?;
            }
        }
    }
    Ok(!moved && !kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_is_measured() {
        // 6.18 keeps the destination (the mremap checks come first since 6.17); 6.1
        // punches the hole. Either answer must match what the kernel reports.
        let punches = probe().expect("the probe runs");
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut v = release.split(|c: char| !c.is_ascii_digit()).filter_map(|s| s.parse::<u32>().ok());
        let (major, minor) = (v.next().unwrap(), v.next().unwrap());
        if (major, minor) >= (6, 17) {
            assert!(!punches, "Linux {release} is expected to keep the destination");
        } else if (major, minor) <= (6, 1) {
            assert!(punches, "Linux {release} is expected to punch the hole");
        }
    }
}
