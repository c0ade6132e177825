//! The thin layer that talks to the kernel.
//!
//! Every system call iovmap makes goes through this module. Each wrapper returns
//! [`io::Result`] (errno is read here and nowhere else), and each `unsafe` block carries
//! the argument for its soundness. Functions that can destroy or change memory the
//! caller may not own (`MAP_FIXED`, `MREMAP_FIXED`, `munmap`, `mprotect`) are `unsafe fn`
//! with a `# Safety` section; the others are safe. Memory iovmap owns (reservations,
//! views) is passed as `NonNull<u8>`; other mappings' addresses, which are only looked
//! up or cloned, never dereferenced, as `usize`.
//!
//! Each wrapper of the map and register paths starts with one injection point naming its
//! [`Operation`] and the range it would change; with the `fault-injection` feature (tests
//! only) that is where a test makes it fail. Nothing else of fault injection is here.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;

use crate::error::Operation;
use crate::vma::{Vma, prot_of};

#[cfg(feature = "fault-injection")]
use crate::fault::inject;

/// Without fault injection, the injection point is nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
fn inject(_: Operation, _: std::ops::Range<usize>) -> io::Result<()> {
    Ok(())
}

/// No range: the call changes no mapping iovmap owns.
const NOWHERE: std::ops::Range<usize> = 0..0;

/// `[p, p + len)` as addresses, for the injection point.
#[inline(always)]
fn span(p: NonNull<u8>, len: usize) -> std::ops::Range<usize> {
    p.as_ptr() as usize..(p.as_ptr() as usize).wrapping_add(len)
}

/// The base page size of this machine (sysconf(_SC_PAGESIZE)), read once.
pub(crate) fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(v).ok().filter(|p| p.is_power_of_two()).unwrap_or(4096)
    })
}

fn check_ptr(ret: *mut libc::c_void) -> io::Result<NonNull<u8>> {
    if ret == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // mmap and mremap never return NULL on success: page 0 is below vm.mmap_min_addr and
    // is only handed out with MAP_FIXED, which no caller here passes it.
    NonNull::new(ret.cast()).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))
}

fn check_int(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// Reserves `len` bytes of address space: PROT_NONE, private, no swap accounting;
/// anonymous, or with `file = Some((fd, offset))` a mapping of that file from `offset`,
/// so that the VMA names the file and offset (PROT_NONE: nothing is ever read from it,
/// and the file may be shorter than the range). The kernel chooses the address, so
/// nothing existing is touched.
pub(crate) fn reserve(len: usize, file: Option<(BorrowedFd<'_>, u64)>) -> io::Result<NonNull<u8>> {
    inject(Operation::Reserve, NOWHERE)?;
    let (flags, fd, offset) = match file {
        None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0),
        Some((fd, offset)) => (
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            fd.as_raw_fd(),
            libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?,
        ),
    };
    // SAFETY: addr is NULL and MAP_FIXED is absent, so the kernel picks a free range and
    // no existing mapping can be replaced. The result is checked against MAP_FAILED.
    check_ptr(unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, flags, fd, offset) })
}

/// Unmaps `[addr, addr + len)`.
///
/// # Safety
/// The range must belong to the caller (a reservation or view it created) and no live
/// reference into it may be used afterwards.
pub(crate) unsafe fn unmap(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: forwarded to the caller's contract.
    check_int(unsafe { libc::munmap(addr.as_ptr().cast(), len) }).map(drop)
}

/// Unmaps the over-reserved head or tail of a reservation.
///
/// # Safety
/// As [`unmap`].
pub(crate) unsafe fn trim(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    inject(Operation::Trim, span(addr, len))?;
    // SAFETY: forwarded to the caller's contract.
    unsafe { unmap(addr, len) }
}

/// Clones `[src, src + len)` to `dst` with `mremap(src, 0, len, MREMAP_FIXED |
/// MREMAP_MAYMOVE, dst)`: a second mapping of the same pages, `src` untouched.
///
/// # Safety
/// `[dst, dst + len)` must lie inside a reservation the caller owns; whatever is mapped
/// there is replaced.
pub(crate) unsafe fn clone_fixed(src: usize, len: usize, dst: NonNull<u8>) -> io::Result<()> {
    inject(Operation::Clone, span(dst, len))?;
    // SAFETY: the kernel validates `src` (EFAULT if unmapped); `dst` is owned by the
    // caller, so replacing what is there is the intended effect.
    let ret = unsafe {
        libc::mremap(
            src as *mut libc::c_void,
            0,
            len,
            libc::MREMAP_FIXED | libc::MREMAP_MAYMOVE,
            dst.as_ptr().cast::<libc::c_void>(),
        )
    };
    check_ptr(ret).map(drop)
}

/// Clones `[src, src + len)` to an address the kernel chooses and returns it: a one-run
/// view placed without a reservation (`op` [`Operation::Clone`]), or, on kernels that
/// punch holes, learning whether a mapping can be cloned without touching any range
/// iovmap owns ([`Operation::CloneProbe`]).
pub(crate) fn clone_anywhere(src: usize, len: usize, op: Operation) -> io::Result<NonNull<u8>> {
    inject(op, NOWHERE)?;
    // SAFETY: without MREMAP_FIXED the kernel picks a free destination, and old_size 0
    // leaves the source mapping in place: no existing mapping is changed.
    check_ptr(unsafe { libc::mremap(src as *mut libc::c_void, 0, len, libc::MREMAP_MAYMOVE) })
}

/// `mmap(dst, len, prot, MAP_SHARED | placement, fd, offset)`.
///
/// # Safety
/// With `placement` MAP_FIXED, `[dst, dst + len)` must belong to the caller; with
/// MAP_FIXED_NOREPLACE nothing existing can be replaced.
unsafe fn map_fd_at(
    dst: NonNull<u8>,
    len: usize,
    prot: libc::c_int,
    fd: BorrowedFd<'_>,
    offset: u64,
    placement: libc::c_int,
) -> io::Result<NonNull<u8>> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: forwarded to the caller's contract; `fd` is a live descriptor.
    check_ptr(unsafe {
        libc::mmap(dst.as_ptr().cast(), len, prot, libc::MAP_SHARED | placement, fd.as_raw_fd(), offset)
    })
}

/// Maps `len` bytes of `fd` from `offset` at exactly `dst`, MAP_SHARED.
///
/// # Safety
/// `[dst, dst + len)` must lie inside a reservation the caller owns; whatever is mapped
/// there is replaced.
pub(crate) unsafe fn map_fd_fixed(
    dst: NonNull<u8>,
    len: usize,
    prot: libc::c_int,
    fd: BorrowedFd<'_>,
    offset: u64,
) -> io::Result<()> {
    inject(Operation::FdMap, span(dst, len))?;
    // SAFETY: forwarded to the caller's contract.
    unsafe { map_fd_at(dst, len, prot, fd, offset, libc::MAP_FIXED) }.map(drop)
}

/// Maps `len` bytes of `fd` from `offset` at exactly `dst`, MAP_SHARED, only if nothing
/// is mapped there (MAP_FIXED_NOREPLACE): EEXIST if anything is. Used where a range of
/// the reservation may have become a hole that another thread could have taken.
pub(crate) fn map_fd_noreplace(
    dst: NonNull<u8>,
    len: usize,
    prot: libc::c_int,
    fd: BorrowedFd<'_>,
    offset: u64,
) -> io::Result<()> {
    inject(Operation::RefillHole, span(dst, len))?;
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    match unsafe { map_fd_at(dst, len, prot, fd, offset, libc::MAP_FIXED_NOREPLACE) } {
        // Kernels before 4.17 ignore the flag and may return another address.
        Ok(at) if at != dst => {
            // SAFETY: the mapping just made at `at` is ours and nothing refers to it.
            unsafe { libc::munmap(at.as_ptr().cast(), len) };
            Err(io::Error::from_raw_os_error(libc::EEXIST))
        }
        r => r.map(drop),
    }
}

/// The seals of a memfd (`fcntl(F_GET_SEALS)`); EINVAL for a file that is not a memfd.
pub(crate) fn memfd_seals(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS only reads the file's seals; the result is checked.
    check_int(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })
}

/// Opens `/dev/udmabuf` read-write, close-on-exec.
pub(crate) fn open_udmabuf() -> io::Result<OwnedFd> {
    inject(Operation::UdmabufOpen, NOWHERE)?;
    // SAFETY: a valid NUL-terminated path; the result is checked.
    let fd = check_int(unsafe { libc::open(c"/dev/udmabuf".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `struct udmabuf_create_item` of `<linux/udmabuf.h>`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct UdmabufItem {
    pub memfd: u32,
    pub pad: u32,
    pub offset: u64,
    pub size: u64,
}

/// `struct udmabuf_create_list` without its flexible array: what the ioctl number encodes.
#[repr(C)]
struct UdmabufListHead {
    _flags: u32,
    _count: u32,
}

const UDMABUF_FLAGS_CLOEXEC: u32 = 0x01;
/// `_IOW('u', 0x43, struct udmabuf_create_list)`.
const UDMABUF_CREATE_LIST: libc::c_ulong = 0x4008_7543;
const _: () = assert!(std::mem::size_of::<UdmabufListHead>() == 8 && std::mem::size_of::<UdmabufItem>() == 24);

/// Builds one dma-buf (close-on-exec) from `items`, ranges of memfds with F_SEAL_SHRINK
/// and without F_SEAL_WRITE, page-aligned: `ioctl(dev, UDMABUF_CREATE_LIST)`. The kernel
/// pins the pages until the buffer is released.
pub(crate) fn udmabuf_create_list(dev: BorrowedFd<'_>, items: &[UdmabufItem]) -> io::Result<OwnedFd> {
    inject(Operation::UdmabufCreate, NOWHERE)?;
    let count = u32::try_from(items.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    // The head and the items, in the kernel's layout (native-endian fields, no padding
    // between them: checked by the size assertion above).
    let mut buf = Vec::with_capacity(8 + 24 * items.len());
    buf.extend_from_slice(&UDMABUF_FLAGS_CLOEXEC.to_ne_bytes());
    buf.extend_from_slice(&count.to_ne_bytes());
    for item in items {
        buf.extend_from_slice(&item.memfd.to_ne_bytes());
        buf.extend_from_slice(&item.pad.to_ne_bytes());
        buf.extend_from_slice(&item.offset.to_ne_bytes());
        buf.extend_from_slice(&item.size.to_ne_bytes());
    }
    // SAFETY: `buf` is a struct udmabuf_create_list followed by its `count` items, as
    // the kernel reads them (copy_from_user, no alignment needed); it is only read.
    let fd = check_int(unsafe { libc::ioctl(dev.as_raw_fd(), UDMABUF_CREATE_LIST, buf.as_ptr()) })?;
    // SAFETY: the ioctl returned a fresh dma-buf descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `VFIO_DEVICE_FEATURE`: `_IO(VFIO_TYPE, VFIO_BASE + 17)`.
const VFIO_DEVICE_FEATURE: libc::c_ulong = 0x3b75;
/// `VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF` (feature 11, Linux 6.19+).
const VFIO_GET_DMA_BUF: u32 = (1 << 16) | 11;

/// Exports `ranges` (offset in the region, length) of vfio-pci region `index` of `device`
/// as one dma-buf, read-write and close-on-exec: `ioctl(device, VFIO_DEVICE_FEATURE)`
/// with `VFIO_DEVICE_FEATURE_DMA_BUF`. The dma-buf is for peer-to-peer importers: vfio
/// gives it no CPU mapping.
pub(crate) fn vfio_dmabuf(device: BorrowedFd<'_>, index: u32, ranges: &[(u64, u64)]) -> io::Result<OwnedFd> {
    inject(Operation::VfioDmabuf, NOWHERE)?;
    let count = u32::try_from(ranges.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let argsz = u32::try_from(24 + 16 * ranges.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    // struct vfio_device_feature (argsz, flags), then struct vfio_device_feature_dma_buf
    // (region_index, open_flags, flags, nr_ranges) and its ranges (offset, length).
    let mut buf = Vec::with_capacity(argsz as usize);
    for word in [argsz, VFIO_GET_DMA_BUF, index, (libc::O_RDWR | libc::O_CLOEXEC) as u32, 0, count] {
        buf.extend_from_slice(&word.to_ne_bytes());
    }
    for &(offset, len) in ranges {
        buf.extend_from_slice(&offset.to_ne_bytes());
        buf.extend_from_slice(&len.to_ne_bytes());
    }
    // SAFETY: `buf` is `argsz` bytes laid out as the kernel reads them (copy_from_user,
    // no alignment needed); it is only read.
    let fd = check_int(unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_FEATURE, buf.as_ptr()) })?;
    // SAFETY: the ioctl returned a fresh dma-buf descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Maps `len` bytes of a dma-buf from its start at exactly `dst`, MAP_SHARED.
///
/// # Safety
/// `[dst, dst + len)` must lie inside a reservation the caller owns; whatever is mapped
/// there is replaced.
pub(crate) unsafe fn map_dmabuf_fixed(
    dst: NonNull<u8>,
    len: usize,
    prot: libc::c_int,
    fd: BorrowedFd<'_>,
) -> io::Result<()> {
    inject(Operation::DmabufMap, span(dst, len))?;
    // SAFETY: forwarded to the caller's contract.
    unsafe { map_fd_at(dst, len, prot, fd, 0, libc::MAP_FIXED) }.map(drop)
}

/// Reads a small decimal number from a file (a sysfs parameter).
pub(crate) fn read_number(path: &CStr) -> io::Result<u64> {
    let mut buf = Vec::with_capacity(32);
    read_file(path, &mut buf)?;
    std::str::from_utf8(&buf)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a number"))
}

/// Creates a memfd (close-on-exec).
pub(crate) fn memfd(name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid C string; the result is checked.
    let fd = check_int(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the size of a file.
pub(crate) fn truncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: ftruncate on a live descriptor.
    check_int(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
}

/// Maps `len` bytes of `fd` from `offset`, shared, where the kernel chooses (a hugetlb
/// file's mapping is aligned to its huge page by the kernel).
pub(crate) fn map_shared(len: usize, prot: libc::c_int, fd: BorrowedFd<'_>, offset: u64) -> io::Result<NonNull<u8>> {
    inject(Operation::FdMap, NOWHERE)?;
    // SAFETY: NULL address and no MAP_FIXED: the kernel picks free space, so no existing
    // mapping can be replaced.
    check_ptr(unsafe {
        libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd.as_raw_fd(), offset as libc::off_t)
    })
}

/// `mremap(old, old_len, new_len, MREMAP_FIXED | MREMAP_MAYMOVE, dst)`: a move.
///
/// # Safety
/// `[old, old + old_len)` and `[dst, dst + new_len)` must belong to the caller.
pub(crate) unsafe fn move_fixed(
    old: NonNull<u8>,
    old_len: usize,
    new_len: usize,
    dst: NonNull<u8>,
) -> io::Result<NonNull<u8>> {
    // SAFETY: forwarded to the caller's contract.
    check_ptr(unsafe {
        libc::mremap(
            old.as_ptr().cast(),
            old_len,
            new_len,
            libc::MREMAP_FIXED | libc::MREMAP_MAYMOVE,
            dst.as_ptr().cast::<libc::c_void>(),
        )
    })
}

/// Changes the protection of `[addr, addr + len)`.
///
/// # Safety
/// The range must belong to the caller.
pub(crate) unsafe fn protect(addr: NonNull<u8>, len: usize, prot: libc::c_int) -> io::Result<()> {
    inject(Operation::Protect, span(addr, len))?;
    // SAFETY: forwarded to the caller's contract.
    check_int(unsafe { libc::mprotect(addr.as_ptr().cast(), len, prot) }).map(drop)
}

/// Prefaults `[addr, addr + len)` with MADV_POPULATE_WRITE (or _READ when `write` is
/// false). Populating never changes the contents of memory.
///
/// Kernels before 5.14 have neither advice (EINVAL, and an empty range tells that apart
/// from EINVAL for the range): there the pages are faulted in by reading one byte of
/// each with `process_vm_readv` on this process, which reports a page that cannot be
/// faulted in as EFAULT where a plain load would raise SIGBUS. Read faults map the pages;
/// on memory that tracks dirty pages (not shmem or hugetlbfs) the first write to each
/// still takes a minor fault.
pub(crate) fn populate(addr: NonNull<u8>, len: usize, write: bool) -> io::Result<()> {
    let advice = if write { libc::MADV_POPULATE_WRITE } else { libc::MADV_POPULATE_READ };
    prefault(addr, len, advice, Operation::Populate, span(addr, len))
}

/// Faults in `[addr, addr + len)` of a source mapping registered with a userfaultfd
/// (MISSING or MINOR), so that its monitor places or approves every page: the same
/// prefaulting as [`populate`], read-only, through the registered mapping itself. Blocks
/// until the monitor has resolved every fault. Touches no mapping and changes no bytes.
pub(crate) fn fault_in_armed(addr: usize, len: usize) -> io::Result<()> {
    let at = NonNull::new(addr as *mut u8).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
    // Not our mapping: an injected failure must not touch it (`NOWHERE`).
    prefault(at, len, libc::MADV_POPULATE_READ, Operation::FaultInArmed, NOWHERE)
}

/// `madvise(advice)` over `[addr, addr + len)`, or, before 5.14, one-byte reads of each
/// page (`prefault_by_reading`); `op` and `range` are what fault injection sees, before
/// each of the two.
fn prefault(
    addr: NonNull<u8>,
    len: usize,
    advice: libc::c_int,
    op: Operation,
    range: std::ops::Range<usize>,
) -> io::Result<()> {
    inject(op, range.clone())?;
    match madvise_populate(addr.as_ptr(), len, advice) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !populate_advice_exists() => {
            log::debug!("iovmap: no MADV_POPULATE_* (Linux before 5.14): prefaulting by reads");
            inject(op, range)?;
            prefault_by_reading(addr, len)
        }
        other => other,
    }
}

/// `struct uffdio_range` and `struct uffdio_register` of `<linux/userfaultfd.h>`.
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
/// `_IOR(0xAA, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);

/// `ioctl(uffd, UFFDIO_REGISTER)` of `[start, start + len)` in `mode`
/// (`UFFDIO_REGISTER_MODE_*`); returns the ioctls the kernel allows on the range.
pub(crate) fn uffd_register(uffd: BorrowedFd<'_>, start: usize, len: usize, mode: u64) -> io::Result<u64> {
    let mut r = UffdioRegister { start: start as u64, len: len as u64, mode, ioctls: 0 };
    // SAFETY: `r` is a correctly sized and initialised struct uffdio_register (checked by
    // the size assertion above); the kernel writes only its `ioctls` field. Registering
    // changes no mapping's contents: faults in the range go to the userfaultfd.
    check_int(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &mut r as *mut UffdioRegister) })?;
    Ok(r.ioctls)
}

/// `ioctl(uffd, UFFDIO_UNREGISTER)` of `[start, start + len)`.
pub(crate) fn uffd_unregister(uffd: BorrowedFd<'_>, start: usize, len: usize) -> io::Result<()> {
    let range = [start as u64, len as u64];
    // SAFETY: `range` is a struct uffdio_range (two u64), which the kernel only reads.
    check_int(unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_UNREGISTER, range.as_ptr()) }).map(drop)
}

/// Whether this kernel knows MADV_POPULATE_READ (Linux 5.14+): it validates the advice
/// before the range, and an empty range is then a success.
fn populate_advice_exists() -> bool {
    madvise_populate(std::ptr::null_mut(), 0, libc::MADV_POPULATE_READ).is_ok()
}

fn madvise_populate(addr: *mut u8, len: usize, advice: libc::c_int) -> io::Result<()> {
    #[cfg(feature = "fault-injection")]
    if crate::fault::emulating_no_populate_advice() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: MADV_POPULATE_* only faults pages in as a user access would; it cannot
    // change memory contents or mappings. An unmapped range yields ENOMEM, an empty one
    // nothing, never UB.
    check_int(unsafe { libc::madvise(addr.cast(), len, advice) }).map(drop)
}

/// Faults in every base page of `[addr, addr + len)` by reading its first byte through
/// `process_vm_readv` (this process as the remote), up to 1,024 pages per call.
fn prefault_by_reading(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    const BATCH: usize = 1024; // UIO_MAXIOV
    let page = page_size();
    let mut sink = [0u8; BATCH];
    let mut remote = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 1 }; BATCH];
    let mut at = 0;
    while at < len {
        let n = ((len - at).div_ceil(page)).min(BATCH);
        for (i, r) in remote[..n].iter_mut().enumerate() {
            r.iov_base = addr.as_ptr().wrapping_add(at + i * page).cast();
        }
        let local = libc::iovec { iov_base: sink.as_mut_ptr().cast(), iov_len: n };
        // SAFETY: the kernel writes at most `n` bytes into `sink` (the one local iovec)
        // and reads the remote bytes as the process's own loads would, failing with
        // EFAULT instead of a signal; it changes no mapping.
        let read = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, remote.as_ptr(), n as u64, 0) };
        if read < 0 {
            return Err(io::Error::last_os_error());
        }
        if read as usize != n {
            // A short read stops at the first page that could not be faulted in.
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        at += n * page;
    }
    Ok(())
}

/// Duplicates `fd` as a new close-on-exec descriptor.
pub(crate) fn dup_cloexec(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    inject(Operation::DupFd, NOWHERE)?;
    // SAFETY: F_DUPFD_CLOEXEC on a live descriptor; the result is checked.
    let new = check_int(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: `new` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// What `fstat` and `fstatfs` say about a file, as far as iovmap cares.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FileInfo {
    pub dev: u64,
    pub ino: u64,
    /// Size in bytes, meaningful only when `sized` is true (regular files and memfds).
    pub size: u64,
    pub sized: bool,
    /// The huge page size when the file lives on hugetlbfs.
    pub huge_page: Option<usize>,
    /// Whether it is an anonymous-inode file (BPF maps, perf events, io_uring, vfio
    /// group-mode device fds): they all share one `(st_dev, st_ino)`.
    pub anon_inode: bool,
}

/// `ANON_INODE_FS_MAGIC` of `<linux/magic.h>`.
const ANON_INODE_FS_MAGIC: libc::c_long = 0x0904_1934;

/// fstat + fstatfs of `fd`.
pub(crate) fn file_info(fd: BorrowedFd<'_>) -> io::Result<FileInfo> {
    inject(Operation::FileStat, NOWHERE)?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a properly sized out-buffer; fstat fills it on success.
    check_int(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so `st` is initialised.
    let st = unsafe { st.assume_init() };
    let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: as above, for fstatfs.
    check_int(unsafe { libc::fstatfs(fd.as_raw_fd(), fs.as_mut_ptr()) })?;
    // SAFETY: fstatfs succeeded.
    let fs = unsafe { fs.assume_init() };
    let huge_page = (fs.f_type == libc::HUGETLBFS_MAGIC).then_some(fs.f_bsize as usize);
    Ok(FileInfo {
        dev: st.st_dev,
        ino: st.st_ino,
        size: u64::try_from(st.st_size).unwrap_or(0),
        sized: st.st_mode & libc::S_IFMT == libc::S_IFREG,
        huge_page,
        anon_inode: fs.f_type == ANON_INODE_FS_MAGIC,
    })
}

/// Opens a file read-only and close-on-exec.
pub(crate) fn open_read(path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `path` is a valid NUL-terminated string; the result is checked.
    let fd = check_int(unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads from the current position of `fd` into `buf`, retrying on EINTR.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Reads a whole file at `path` by repeated `read` calls into `out`, which is cleared
/// first. Used for /proc files, whose size `fstat` does not report.
pub(crate) fn read_file(path: &CStr, out: &mut Vec<u8>) -> io::Result<()> {
    let fd = open_read(path)?;
    out.clear();
    let mut chunk = 64 * 1024;
    loop {
        let filled = out.len();
        out.resize(filled + chunk, 0);
        let n = read(fd.as_fd(), &mut out[filled..])?;
        out.truncate(filled + n);
        if n == 0 {
            return Ok(());
        }
        chunk = chunk.max(out.len());
    }
}

/// `struct procmap_query` of `<linux/fs.h>` (Linux 6.11+); defined here because the C
/// headers of many distributions predate it.
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: libc::c_ulong = 0xC068_6611;
const _: () = assert!(std::mem::size_of::<ProcmapQuery>() == 104);

/// Flags of a VMA as PROCMAP_QUERY reports them.
const PROCMAP_READABLE: u64 = 0x1;
const PROCMAP_WRITABLE: u64 = 0x2;
const PROCMAP_EXECUTABLE: u64 = 0x4;
const PROCMAP_SHARED: u64 = 0x8;

/// Asks the kernel which VMA covers `addr`. `Ok(None)`: no VMA covers it (or one this
/// platform's addresses cannot hold). ENOTTY means the kernel predates PROCMAP_QUERY
/// (before 6.11).
pub(crate) fn procmap_query(maps: BorrowedFd<'_>, addr: usize) -> io::Result<Option<Vma>> {
    inject(Operation::VmaQuery, NOWHERE)?;
    let mut q = ProcmapQuery {
        size: std::mem::size_of::<ProcmapQuery>() as u64,
        query_addr: addr as u64,
        ..Default::default()
    };
    // SAFETY: `q` is a correctly sized and initialised struct procmap_query (checked by
    // the size assertion above), with no name or build-id buffers (sizes 0, addresses 0).
    let ret = unsafe { libc::ioctl(maps.as_raw_fd(), PROCMAP_QUERY, &mut q as *mut ProcmapQuery) };
    match check_int(ret) {
        Ok(_) => {
            let (Ok(start), Ok(end)) = (usize::try_from(q.vma_start), usize::try_from(q.vma_end)) else {
                return Ok(None);
            };
            let flag = |f: u64| q.vma_flags & f != 0;
            Ok(Some(Vma {
                start,
                end,
                prot: prot_of(flag(PROCMAP_READABLE), flag(PROCMAP_WRITABLE), flag(PROCMAP_EXECUTABLE)),
                shared: flag(PROCMAP_SHARED),
                page_size: usize::try_from(q.vma_page_size).ok().filter(|p| p.is_power_of_two()).unwrap_or(page_size()),
                offset: q.vma_offset,
                file: crate::regions::FileId::new(q.dev_major, q.dev_minor, q.inode),
            }))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads /proc/self/maps into `out`, to look VMAs up (kernels without PROCMAP_QUERY).
pub(crate) fn read_maps(out: &mut Vec<u8>) -> io::Result<()> {
    inject(Operation::MapsRead, NOWHERE)?;
    read_file(c"/proc/self/maps", out)
}

/// Reads /proc/self/maps into `out`, to count the process's VMAs.
pub(crate) fn read_maps_to_count(out: &mut Vec<u8>) -> io::Result<()> {
    inject(Operation::VmaCount, NOWHERE)?;
    read_file(c"/proc/self/maps", out)
}

/// Reads /proc/sys/vm/max_map_count.
pub(crate) fn max_map_count() -> io::Result<usize> {
    read_number(c"/proc/sys/vm/max_map_count").map(|n| n as usize)
}

/// One private page of iovmap's that the kernel zeroes in the child of a fork
/// (`madvise(MADV_WIPEONFORK)`, Linux 4.14+), for telling, with one load, whether the
/// caller is the process that [`set`](WipeOnFork::set) it. It lives as long as the
/// process (it is never unmapped: a fork may happen at any time).
pub(crate) struct WipeOnFork(NonNull<u8>);

// SAFETY: the page is only read and written through `&self` under the caller's lock
// (vma.rs's MAPS_FD mutex); a plain pointer to memory that lives forever.
unsafe impl Send for WipeOnFork {}

impl WipeOnFork {
    pub(crate) fn new() -> io::Result<Self> {
        let page = page_size();
        // SAFETY: NULL address, no MAP_FIXED: a fresh private page the kernel chooses.
        let p = check_ptr(unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        })?;
        // SAFETY: madvise on the page just mapped, which nothing else knows.
        if let Err(e) = check_int(unsafe { libc::madvise(p.as_ptr().cast(), page, libc::MADV_WIPEONFORK) }) {
            // SAFETY: the page just mapped, unused.
            unsafe { libc::munmap(p.as_ptr().cast(), page) };
            return Err(e);
        }
        Ok(WipeOnFork(p))
    }

    /// Marks the page in this process (a fork's child reads it as unset).
    pub(crate) fn set(&self) {
        // SAFETY: the page is mapped read-write for the life of the process.
        unsafe { self.0.as_ptr().write_volatile(1) }
    }

    /// Whether this process set the page (false in a fork's child until it sets it).
    pub(crate) fn is_set(&self) -> bool {
        // SAFETY: as in `set`.
        unsafe { self.0.as_ptr().read_volatile() == 1 }
    }
}

/// The id of the calling process.
pub(crate) fn getpid() -> libc::pid_t {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}
