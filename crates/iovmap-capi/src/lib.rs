//! # iovmap's C API: `libiovmap.a`, `libiovmap.so` and `include/iovmap.h`
//!
//! A small C interface to [`iovmap`](iovmap_core) for C virtual machine monitors: a
//! remapper holds the registered fds of memory the kernel will not clone (vfio-pci BARs,
//! hugetlbfs RAM); `iovmap_map` turns a `struct iovec` list into one contiguous view that
//! aliases the guest's pages. Every function returning `int` returns `IOVMAP_OK` (0)
//! or a negative `IOVMAP_E_*` code ([`IovmapCode`]), one per kind of error, and leaves a message (and,
//! where one is at fault, the index of the segment) for the calling thread:
//! [`iovmap_last_error_message`], [`iovmap_last_error_index`]. No panic crosses the
//! boundary, and NULL pointers and negative counts are errors, not crashes.
//!
//! The header is generated from this crate by cbindgen (`cbindgen.toml`) and committed;
//! `tests/header.rs` fails when it is stale. `docs/c-api.md` in the repository is the
//! guide for C users: ownership, threads, linking from Makefile and meson.
//!
//! In Rust the crate is `iovmap_capi`, so cargo builds `libiovmap_capi.a` and
//! `libiovmap_capi.so`; `install.sh` installs them as `libiovmap.a` and
//! `libiovmap.so.<abi>` (the SONAME) with the `libiovmap.so` link, for `-liovmap`.
//!
//! The same calls from Rust (what the C example does, in short):
//!
//! ```
//! use std::ptr;
//! use iovmap_capi::*;
//! let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
//! // Shared memory of 4 pages stands in for guest RAM.
//! let ram = unsafe {
//!     libc::mmap(ptr::null_mut(), 4 * page, libc::PROT_READ | libc::PROT_WRITE,
//!                libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
//! } as *mut u8;
//! unsafe { ram.add(3 * page).write(3) };
//! let iov = |p: usize| libc::iovec { iov_base: unsafe { ram.add(p * page) }.cast(), iov_len: page };
//! let list = [iov(3), iov(0)];
//!
//! let r = iovmap_remapper_new();
//! let mut view = ptr::null_mut();
//! assert_eq!(unsafe { iovmap_map(r, list.as_ptr(), 2, IOVMAP_MAP_POPULATE, &mut view) }, IOVMAP_OK.raw());
//! assert_eq!(unsafe { iovmap_view_len(view) }, 2 * page);
//! assert_eq!(unsafe { iovmap_view_ptr(view).cast::<u8>().read_volatile() }, 3);
//! let mut stats = IovmapStats::default();
//! assert_eq!(unsafe { iovmap_view_stats(view, &mut stats) }, IOVMAP_OK.raw());
//! assert_eq!((stats.runs, stats.cloned), (2, 2));
//! unsafe { iovmap_view_free(view) };
//! unsafe { iovmap_remapper_free(r) };
//! # unsafe { libc::munmap(ram.cast(), 4 * page) };
//! ```
//!
//! Errors are codes, with a message and the index of the iovec at fault kept for the
//! calling thread (the header's comments are these items' rustdoc, so the examples live
//! here rather than in them):
//!
//! ```
//! use std::ffi::CStr;
//! use std::ptr;
//! use iovmap_capi::*;
//! let private = vec![0u8; 3 * 4096]; // heap memory: private, cannot be aliased
//! let list = [
//!     libc::iovec { iov_base: ptr::null_mut(), iov_len: 0 }, // skipped
//!     libc::iovec { iov_base: private.as_ptr() as *mut _, iov_len: 4096 },
//! ];
//! let r = iovmap_remapper_new();
//! let mut view = ptr::null_mut();
//! let rc = unsafe { iovmap_map(r, list.as_ptr(), 2, 0, &mut view) };
//! assert_eq!(rc, IOVMAP_E_NOT_SHAREABLE.raw());
//! assert!(view.is_null());
//! assert_eq!(iovmap_last_error_index(), 1);
//! let msg = unsafe { CStr::from_ptr(iovmap_last_error_message()) }.to_str().unwrap();
//! assert!(msg.contains("segment 1 lies in private memory"), "{msg}");
//! let name = unsafe { CStr::from_ptr(iovmap_strerror(rc)) }.to_str().unwrap();
//! assert!(name.starts_with("IOVMAP_E_NOT_SHAREABLE"));
//! // NULL pointers and negative counts are errors too, naming no segment.
//! assert_eq!(unsafe { iovmap_map(ptr::null(), list.as_ptr(), 2, 0, &mut view) }, IOVMAP_E_INVALID_ARGUMENT.raw());
//! assert_eq!(iovmap_last_error_index(), -1);
//! unsafe { iovmap_remapper_free(r) };
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::ffi::{c_int, c_uint, c_void};
use std::os::fd::BorrowedFd;
use std::ptr;

use iovmap_core::{MapOptions, Remapper};

mod dmabuf;
mod error;
mod userfaultfd;

pub use dmabuf::IovmapDeclined::{self, *};
pub use dmabuf::{
    IovmapDmabuf, IovmapDmabufs, IovmapKernelBuilt, iovmap_dmabuf_exporter, iovmap_dmabufs_count, iovmap_dmabufs_free,
    iovmap_dmabufs_get, iovmap_dmabufs_lead, iovmap_dmabufs_len, iovmap_dmabufs_new, iovmap_dmabufs_take,
    iovmap_view_dmabuf, iovmap_view_dmabuf_count, iovmap_view_kernel_built,
};
pub use error::IovmapCode::{self, *};
use error::{Failure, guard, guard_value};
pub use error::{iovmap_last_error_index, iovmap_last_error_message, iovmap_strerror};
pub use userfaultfd::{
    IOVMAP_UFFD_MINOR, IOVMAP_UFFD_MISSING, IOVMAP_UFFD_WP, iovmap_uffd_declare_armed, iovmap_uffd_declare_disarmed,
    iovmap_uffd_register, iovmap_uffd_resolve, iovmap_uffd_unregister,
};

/// `iovmap_map` flag: a read-only view; a write through it faults (SIGSEGV). Without it
/// the view is read-write and every run's backing must accept writes.
pub const IOVMAP_MAP_READ_ONLY: c_uint = 1 << 0;
/// `iovmap_map` flag: prefault the RAM runs of the view (MADV_POPULATE_READ/WRITE,
/// Linux 5.14+) so first accesses do not fault. Device runs (vfio BARs) are skipped.
pub const IOVMAP_MAP_POPULATE: c_uint = 1 << 1;
/// `iovmap_map` flag: let the view allow more than its source mappings. Without it a
/// read-write view of memory the process mapped read-only (a ROM, a sealed firmware
/// image) is refused with `IOVMAP_E_NOT_WRITABLE`, because writes through the view would
/// change memory the VMM chose to protect. With it the view is writable wherever the
/// backing file allows (a read-only fd or a write-sealed memfd still refuses).
pub const IOVMAP_MAP_RAISE_SOURCE_PROTECTION: c_uint = 1 << 2;
/// `iovmap_map` flag: place every run by clone or fd mapping, never through udmabuf (no
/// dma-buf, no pinned pages), as iovmap 0.1 did.
pub const IOVMAP_MAP_REMAP_ONLY: c_uint = 1 << 3;
/// `iovmap_map` flag: build the whole view through udmabuf, or fail with
/// `IOVMAP_E_KERNEL_BUILT` naming the iovec it cannot take and why; the view's dma-bufs
/// (`iovmap_view_dmabuf`) then cover all of it. Without this flag or
/// `IOVMAP_MAP_REMAP_ONLY`, placement is automatic: scattered runs of registered, sealed
/// memfds go through udmabuf where `/dev/udmabuf` exists, and it falls back to remapping,
/// without error, where udmabuf is missing or refuses (`iovmap_view_kernel_built`).
pub const IOVMAP_MAP_KERNEL_BUILT: c_uint = 1 << 4;

const KNOWN_FLAGS: c_uint = IOVMAP_MAP_READ_ONLY
    | IOVMAP_MAP_POPULATE
    | IOVMAP_MAP_RAISE_SOURCE_PROTECTION
    | IOVMAP_MAP_REMAP_ONLY
    | IOVMAP_MAP_KERNEL_BUILT;

/// A remapper (opaque): the registered regions whose fds stand in where the kernel will
/// not clone a mapping. Create with `iovmap_remapper_new`, free with
/// `iovmap_remapper_free`.
///
/// Threads: any number of threads may call `iovmap_map` with one remapper at once;
/// `iovmap_register`, `iovmap_unregister` and `iovmap_remapper_free` need it to
/// themselves (no other call with it, `iovmap_map` included, at the same time).
#[derive(Debug)]
pub struct IovmapRemapper {
    inner: Remapper,
}

/// A view (opaque): one contiguous mapping of all the pieces of an iovec list, aliasing
/// them. Made by `iovmap_map`; `iovmap_view_free` unmaps it. It does not depend on the
/// remapper that made it, which may be freed first.
///
/// Threads: `iovmap_view_ptr`, `iovmap_view_len` and `iovmap_view_stats` may run on any
/// threads at once; `iovmap_view_free`, on any thread, must be the last call with it.
#[derive(Debug)]
pub struct IovmapView {
    inner: iovmap_core::View,
}

/// What building a view took.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IovmapStats {
    /// Non-empty segments in the list.
    pub segments: u64,
    /// Mapping operations after coalescing adjacent segments.
    pub runs: u64,
    /// Runs placed by cloning the source mapping (mremap).
    pub cloned: u64,
    /// Runs placed by mapping a registered fd (mmap).
    pub fd_mapped: u64,
    /// mremap/mmap calls made for runs, refused clones included.
    pub syscalls: u64,
}

impl From<&iovmap_core::MapStats> for IovmapStats {
    fn from(s: &iovmap_core::MapStats) -> Self {
        IovmapStats {
            segments: s.segments as u64,
            runs: s.runs as u64,
            cloned: s.cloned as u64,
            fd_mapped: s.fd_mapped as u64,
            syscalls: s.syscalls as u64,
        }
    }
}

/// A new remapper with nothing registered, or NULL if it could not be made (then
/// `iovmap_last_error_message` says why). Free it with `iovmap_remapper_free`.
#[unsafe(no_mangle)]
pub extern "C" fn iovmap_remapper_new() -> *mut IovmapRemapper {
    guard_value("iovmap_remapper_new", ptr::null_mut(), || {
        Box::into_raw(Box::new(IovmapRemapper { inner: Remapper::new() }))
    })
}

/// Frees a remapper and closes the fds it duplicated. NULL is ignored. Views made with
/// it stay valid: free them with `iovmap_view_free` whenever suits.
///
/// # Safety
/// `r` is NULL or a remapper from `iovmap_remapper_new` not yet freed; no other call
/// may use it during or after this one.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_remapper_free(r: *mut IovmapRemapper) {
    guard_value("iovmap_remapper_free", (), || {
        if !r.is_null() {
            // SAFETY: `r` came from `Box::into_raw` in `iovmap_remapper_new` and the
            // caller hands it back exactly once, with no other user left (contract).
            drop(unsafe { Box::from_raw(r) });
        }
    })
}

/// Declares that the `len` bytes mapped at `addr` are the file `fd` from `offset`, so
/// runs there that the kernel will not clone (vfio-pci BARs: the device fd at the
/// region's offset; hugetlbfs RAM: its file) are mapped from the fd instead. Memory the
/// kernel clones (memfd, shmem, shared anonymous) needs no registration.
///
/// The fd is duplicated (close-on-exec): the caller may close its own afterwards. The
/// range must be mapped, shared, not overlap a registered region, and be aligned to its
/// page size (address, length and offset; the huge page size for hugetlbfs); a file
/// with a size must hold `offset + len` bytes.
///
/// The mapping at `addr` must be of `fd`'s file (same device and inode), and, for regular
/// files, memfds and hugetlbfs files, at `offset`: a wrong fd (a pipe, another file) or
/// offset is refused. Every later `iovmap_map` checks that the memory there is still what
/// was registered, and refuses a segment whose mapping was replaced
/// (`IOVMAP_E_INVALID_REGION`, with the index). What cannot be verified: for device fds
/// (vfio) the offset the kernel reports is driver-defined, so it is taken on trust; and
/// all anonymous-inode files (vfio group-mode device fds) share one inode, so such a
/// mapping replaced by another anonymous-inode mapping looks unchanged. So: call
/// `iovmap_unregister` before unmapping or replacing registered memory (memory hot-unplug,
/// a remapped RAMBlock), and register the new mapping afterwards.
///
/// Returns `IOVMAP_OK`, `IOVMAP_E_INVALID_ARGUMENT` (NULL remapper, negative or closed
/// fd) or `IOVMAP_E_INVALID_REGION` (the message says what is wrong). On error nothing
/// is registered.
///
/// # Safety
/// `r` is NULL or a live remapper, and no other call uses it during this one (register
/// needs exclusive access: no concurrent `iovmap_map` on it either). `fd` stays open
/// during the call. `addr` is only looked up, never dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_register(
    r: *mut IovmapRemapper,
    addr: *const c_void,
    len: usize,
    fd: c_int,
    offset: u64,
) -> c_int {
    const F: &str = "iovmap_register";
    guard(F, || {
        // SAFETY: `r` is NULL or a live remapper nobody else uses meanwhile (contract).
        let r = unsafe { r.as_mut() }.ok_or_else(|| Failure::argument(F, "the remapper is NULL"))?;
        // SAFETY: the fd is open (checked) and the caller keeps it open during the call;
        // iovmap duplicates it before returning and keeps only the duplicate.
        let fd = unsafe { open_fd(F, fd) }?;
        r.inner.register(addr.cast(), len, fd, offset)?;
        Ok(())
    })
}

/// Checks that `fd` is an open fd and borrows it.
///
/// # Safety
/// The fd, if open, must stay open while the returned value is used.
pub(crate) unsafe fn open_fd<'a>(function: &str, fd: c_int) -> Result<BorrowedFd<'a>, Failure> {
    if fd < 0 {
        return Err(Failure::argument(
            function,
            format!("fd {fd} is negative: pass the open fd that backs the region"),
        ));
    }
    // SAFETY: F_GETFD only reads the fd's flags; any integer is a valid argument.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Failure::argument(function, format!("fd {fd} is not open ({e})")));
    }
    // SAFETY: the fd is open, not -1, and stays open for the borrow (caller's contract).
    Ok(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// Registers one mmap of a vfio-pci region: the `len` bytes at `addr`, which the VMM
/// mapped from the vfio device fd `device_fd` at `region_offset + offset_in_region`, where
/// `region_offset` is the region's offset in the device fd and `region_index` its index
/// (both from `VFIO_DEVICE_GET_REGION_INFO`; QEMU: `region->nr`, `region->fd_offset`, and
/// the mmap's `mmaps[i].offset`). As `iovmap_register` does, it lets runs there be mapped
/// from the device fd (the kernel will not clone a BAR), and in addition
/// `iovmap_dmabufs_new` exports them as dma-bufs through vfio-pci (Linux 6.19+), which
/// needs the region's index and offset. Register each mmap where it is made, and
/// `iovmap_unregister` it (by `addr`) before it is unmapped.
///
/// Returns `IOVMAP_OK`, `IOVMAP_E_INVALID_ARGUMENT` (NULL remapper, negative or closed
/// fd) or `IOVMAP_E_INVALID_REGION` (the message says what is wrong: not mapped, not the
/// device's file, unaligned, an overlap). On error nothing is registered.
///
/// # Safety
/// As `iovmap_register`: `r` is NULL or a live remapper no other call uses meanwhile;
/// `device_fd` stays open during the call; `addr` is only looked up.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_register_vfio(
    r: *mut IovmapRemapper,
    addr: *const c_void,
    len: usize,
    device_fd: c_int,
    region_index: u32,
    region_offset: u64,
    offset_in_region: u64,
) -> c_int {
    const F: &str = "iovmap_register_vfio";
    guard(F, || {
        // SAFETY: `r` is NULL or a live remapper nobody else uses meanwhile (contract).
        let r = unsafe { r.as_mut() }.ok_or_else(|| Failure::argument(F, "the remapper is NULL"))?;
        // SAFETY: the fd is open (checked) and the caller keeps it open during the call;
        // iovmap duplicates it before returning and keeps only the duplicate.
        let fd = unsafe { open_fd(F, device_fd) }?;
        r.inner.register_vfio_mmap(fd, region_index, region_offset, offset_in_region, addr.cast(), len)?;
        Ok(())
    })
}

/// Forgets the region registered at `addr` (the address given to `iovmap_register`) and
/// closes its duplicated fd. Views already made keep working.
///
/// Returns `IOVMAP_OK`, `IOVMAP_E_INVALID_ARGUMENT` (NULL remapper) or
/// `IOVMAP_E_INVALID_REGION` (no region starts at `addr`).
///
/// # Safety
/// `r` is NULL or a live remapper, and no other call uses it during this one.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_unregister(r: *mut IovmapRemapper, addr: *const c_void) -> c_int {
    const F: &str = "iovmap_unregister";
    guard(F, || {
        // SAFETY: `r` is NULL or a live remapper nobody else uses meanwhile (contract).
        let r = unsafe { r.as_mut() }.ok_or_else(|| Failure::argument(F, "the remapper is NULL"))?;
        let id = r.inner.regions().find(|g| g.addr == addr.cast()).map(|g| g.id).ok_or_else(|| Failure {
            code: IOVMAP_E_INVALID_REGION,
            message: format!("{F}: no region is registered at {addr:p}: pass the address given to iovmap_register"),
            index: None,
        })?;
        r.inner.unregister(id)?;
        Ok(())
    })
}

/// Maps the `iovcnt` iovecs at `iov` into one contiguous view, without copying, and
/// stores it in `*out`.
///
/// Zero-length iovecs are skipped. Adjacent iovecs that continue each other in one
/// mapping become one run (one syscall). Every boundary between runs must be on a page
/// boundary (the huge page size for hugetlbfs) on both sides; the first iovec may start,
/// and the last end, mid-page, and `iovmap_view_ptr` then points into the first page.
/// `flags` is 0 or a combination of `IOVMAP_MAP_READ_ONLY`, `IOVMAP_MAP_POPULATE` and
/// `IOVMAP_MAP_RAISE_SOURCE_PROTECTION`. Without the last, the view allows no more than
/// each source mapping: a read-write view of a read-only mapping is refused.
///
/// Returns `IOVMAP_OK`, or a negative `IOVMAP_E_*` code with `*out` set to NULL (when
/// `out` is not NULL) and nothing mapped; `iovmap_last_error_index` names the iovec at
/// fault, where there is one.
///
/// # Safety
/// `r` is NULL or a live remapper; any number of threads may map with it at once, but
/// not while a register, unregister or free of it runs. `iov` is NULL or points to
/// `iovcnt` readable `struct iovec`s that do not change during the call (the memory
/// they describe is only looked up, never read). `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_map(
    r: *const IovmapRemapper,
    iov: *const libc::iovec,
    iovcnt: c_int,
    flags: c_uint,
    out: *mut *mut IovmapView,
) -> c_int {
    const F: &str = "iovmap_map";
    guard(F, || {
        // SAFETY: `out` is NULL or writable (contract).
        let out = unsafe { out.as_mut() }.ok_or_else(|| Failure::argument(F, "out is NULL"))?;
        *out = ptr::null_mut();
        // SAFETY: `r` is NULL or a live remapper not being changed meanwhile (contract).
        let r = unsafe { r.as_ref() }.ok_or_else(|| Failure::argument(F, "the remapper is NULL"))?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(Failure::argument(
                F,
                format!(
                    "unknown flags {:#x}: pass IOVMAP_MAP_READ_ONLY, IOVMAP_MAP_POPULATE, \
                     IOVMAP_MAP_RAISE_SOURCE_PROTECTION, IOVMAP_MAP_REMAP_ONLY and/or IOVMAP_MAP_KERNEL_BUILT",
                    flags & !KNOWN_FLAGS
                ),
            ));
        }
        if flags & IOVMAP_MAP_REMAP_ONLY != 0 && flags & IOVMAP_MAP_KERNEL_BUILT != 0 {
            return Err(Failure::argument(F, "IOVMAP_MAP_REMAP_ONLY and IOVMAP_MAP_KERNEL_BUILT exclude each other"));
        }
        // SAFETY: forwarded (contract).
        let iovs = unsafe { iov_slice(F, iov, iovcnt) }?;
        let mut opts = MapOptions::new();
        if flags & IOVMAP_MAP_READ_ONLY != 0 {
            opts = opts.read_only();
        }
        if flags & IOVMAP_MAP_POPULATE != 0 {
            opts = opts.populate();
        }
        if flags & IOVMAP_MAP_RAISE_SOURCE_PROTECTION != 0 {
            opts = opts.raise_source_protection();
        }
        if flags & IOVMAP_MAP_REMAP_ONLY != 0 {
            opts = opts.remap_only();
        }
        if flags & IOVMAP_MAP_KERNEL_BUILT != 0 {
            opts = opts.kernel_built();
        }
        let view = r.inner.map_with(iovs, opts)?;
        *out = Box::into_raw(Box::new(IovmapView { inner: view }));
        Ok(())
    })
}

/// The `iovcnt` iovecs at `iov` as a slice, checked.
///
/// # Safety
/// `iov` is NULL or points to `iovcnt` readable iovecs that do not change while the slice
/// is used.
pub(crate) unsafe fn iov_slice<'a>(
    function: &str,
    iov: *const libc::iovec,
    iovcnt: c_int,
) -> Result<&'a [libc::iovec], Failure> {
    let count =
        usize::try_from(iovcnt).map_err(|_| Failure::argument(function, format!("iovcnt is negative ({iovcnt})")))?;
    if count == 0 {
        Ok(&[])
    } else if iov.is_null() {
        Err(Failure::argument(function, format!("iov is NULL but iovcnt is {count}")))
    } else if !iov.is_aligned() {
        Err(Failure::argument(function, "iov is not aligned for struct iovec"))
    } else {
        // SAFETY: `iov` is non-NULL and aligned, and points to `count` readable iovecs that
        // stay unchanged while the slice is used (contract); `count` comes from a
        // non-negative int, so the slice is far below isize::MAX bytes.
        Ok(unsafe { std::slice::from_raw_parts(iov, count) })
    }
}

/// The first byte of the view (the first byte of the first iovec's memory, seen
/// through the view), or NULL when `v` is NULL. Valid until `iovmap_view_free`. A
/// write through a view mapped with `IOVMAP_MAP_READ_ONLY` faults (SIGSEGV).
///
/// # Safety
/// `v` is NULL or a live view, not being freed meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_view_ptr(v: *const IovmapView) -> *mut c_void {
    guard_value("iovmap_view_ptr", ptr::null_mut(), || {
        // SAFETY: `v` is NULL or a live view (contract).
        unsafe { v.as_ref() }.map_or(ptr::null_mut(), |v| v.inner.as_ptr().cast_mut().cast())
    })
}

/// The byte length of the view (the sum of the iovec lengths), or 0 when `v` is NULL.
///
/// # Safety
/// `v` is NULL or a live view, not being freed meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_view_len(v: *const IovmapView) -> usize {
    guard_value("iovmap_view_len", 0, || {
        // SAFETY: `v` is NULL or a live view (contract).
        unsafe { v.as_ref() }.map_or(0, |v| v.inner.len())
    })
}

/// Stores what building the view took in `*out`.
///
/// Returns `IOVMAP_OK`, or `IOVMAP_E_INVALID_ARGUMENT` when `v` or `out` is NULL.
///
/// # Safety
/// `v` is NULL or a live view, not being freed meanwhile; `out` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_view_stats(v: *const IovmapView, out: *mut IovmapStats) -> c_int {
    const F: &str = "iovmap_view_stats";
    guard(F, || {
        // SAFETY: `v` is NULL or a live view (contract).
        let v = unsafe { v.as_ref() }.ok_or_else(|| Failure::argument(F, "the view is NULL"))?;
        // SAFETY: `out` is NULL or writable (contract).
        let out = unsafe { out.as_mut() }.ok_or_else(|| Failure::argument(F, "out is NULL"))?;
        *out = IovmapStats::from(v.inner.stats());
        Ok(())
    })
}

/// Unmaps the view and frees it. NULL is ignored. The source memory is untouched.
///
/// # Safety
/// `v` is NULL or a view from `iovmap_map` not yet freed; no other call may use it
/// during or after this one, and nothing may access its memory afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_view_free(v: *mut IovmapView) {
    guard_value("iovmap_view_free", (), || {
        if !v.is_null() {
            // SAFETY: `v` came from `Box::into_raw` in `iovmap_map` and the caller hands
            // it back exactly once, with no other user left (contract).
            drop(unsafe { Box::from_raw(v) });
        }
    })
}
