//! What this kernel does with a BAR: device memory, a refused clone, and whether the
//! refusal punches a hole.

use std::sync::atomic::Ordering;

use iovmap::{Error, Remapper};
use iovmap_vmtest::layout::{Piece, Src};
use iovmap_vmtest::mem::{self, page};
use iovmap_vmtest::report::Checks;

use super::Guest;

impl Guest {
    pub(super) fn bar_is_device_memory(&self, c: &mut Checks) {
        let flags = mem::vm_flags(self.bar.ptr() as usize).unwrap_or_default();
        let has = |f: &str| flags.split(' ').any(|x| x == f);
        c.check(
            "bar2-vmflags",
            if has("pf") && has("io") && has("de") {
                Ok(format!("VmFlags {flags} (VM_PFNMAP, VM_IO, VM_DONTEXPAND: the kernel will not clone it)"))
            } else {
                Err(format!("VmFlags {flags}: want pf io de"))
            },
        );
    }

    /// The kernel fact everything stands on, and whether this kernel punches the hole.
    pub(super) fn kernel_refuses_the_clone(&self, c: &mut Checks) {
        let p = page();
        // SAFETY: a fresh PROT_NONE reservation, replacing nothing.
        let res = unsafe {
            libc::mmap(std::ptr::null_mut(), 3 * p, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if res == libc::MAP_FAILED {
            c.fail("kernel-refuses-clone", "cannot reserve 3 pages");
            return;
        }
        let dst = res as usize + p;
        // SAFETY: `dst` is the middle page of our own reservation; whatever the kernel does
        // there, it does to our range.
        let r = unsafe {
            libc::mremap(
                self.bar.ptr().add(p).cast(),
                0,
                p,
                libc::MREMAP_FIXED | libc::MREMAP_MAYMOVE,
                dst as *mut libc::c_void,
            )
        };
        let err = std::io::Error::last_os_error();
        let hole = mem::has_unmapped_page(dst, p);
        self.holes.store(hole, Ordering::Relaxed);
        // SAFETY: our reservation (single-threaded here: nothing else can have taken the hole).
        unsafe { libc::munmap(res, 3 * p) };
        if r != libc::MAP_FAILED {
            c.fail("kernel-refuses-clone", "mremap cloned a vfio BAR page: this kernel is not what the test expects");
            return;
        }
        c.check(
            "kernel-refuses-clone",
            if err.raw_os_error() == Some(libc::EFAULT) {
                Ok(format!(
                    "mremap(BAR, 0, page, MREMAP_FIXED|MREMAP_MAYMOVE, dst) = EFAULT; dst afterwards: {}",
                    if hole { "UNMAPPED (this kernel punches the hole)" } else { "still reserved" }
                ))
            } else {
                Err(format!("mremap refused with {err}, want EFAULT"))
            },
        );
    }

    pub(super) fn unregistered_bar_has_no_fallback(&self, c: &mut Checks) {
        let p = page();
        // What iovmap sets up once per process first (its /proc/self/maps fd; on kernels
        // that punch holes, the probe's thread, whose stack and malloc arena stay cached):
        // a view of RAM in a reservation, before counting.
        let warm = [Piece { src: Src::Ram, off: 2 * p, len: p }, Piece { src: Src::Ram, off: 0, len: p }];
        drop(Remapper::new().map(&self.iov(&warm)));
        let before = mem::vma_count().unwrap_or(0);
        let r = Remapper::new();
        let bar_only = [Piece { src: Src::Bar, off: 0x1_0000, len: p }];
        let mixed = [Piece { src: Src::Ram, off: 0, len: p }, Piece { src: Src::Bar, off: 0x1_0000, len: p }];
        let a = r.map(&self.iov(&bar_only)).map(drop);
        let b = r.map(&self.iov(&mixed)).map(drop);
        let after = mem::vma_count().unwrap_or(0);
        let efault = |e: &std::io::Error| e.raw_os_error() == Some(libc::EFAULT);
        c.check(
            "unregistered-bar-no-fallback",
            match (&a, &b) {
                (Err(Error::NoFallback { index: 0, source: s0 }), Err(Error::NoFallback { index: 1, source: s1 }))
                    if efault(s0) && efault(s1) && before == after =>
                {
                    Ok(format!(
                        "[BAR] -> NoFallback {{ index: 0 }}, [RAM, BAR] -> NoFallback {{ index: 1 }} (EFAULT); \
                                {before} mappings before and after"
                    ))
                }
                _ => Err(format!("got {a:?} and {b:?}; mappings {before} -> {after}")),
            },
        );
    }
}
