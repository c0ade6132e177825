//! The peers iovmap is measured against, on the same scatter lists:
//!
//! - [`naive_map`]: the one-clone-per-iovec loop VMMs ship today (C, in `c/naive.c`);
//! - [`floor_map`]: the floor of any remapper: one pass that coalesces and counts, then
//!   only the placement syscalls (C, in `c/floor.c`); no validation at all;
//! - [`fd_arena`]: one `mmap(MAP_SHARED | MAP_FIXED)` of the fd per iovec into a
//!   reservation, the way crosvm's `MemoryMappingArena` places pieces;
//! - [`bounce_copy`]: a memcpy of every iovec into one buffer, what a VMM does when it
//!   does not remap at all. Tests also use it as the reference for a view's bytes.

#![warn(clippy::undocumented_unsafe_blocks)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use iovmap_testkit::Mapping;

unsafe extern "C" {
    fn iovmap_naive_map(iov: *const libc::iovec, n: usize, out: *mut *mut libc::c_void, out_len: *mut usize) -> i32;
    fn iovmap_floor_map(iov: *const libc::iovec, n: usize, out: *mut *mut libc::c_void, out_len: *mut usize) -> i32;
}

/// The signature both C peers share: map `n` iovecs, return the mapping in `out`/`out_len`,
/// 0 or a negative errno.
type CMap = unsafe extern "C" fn(*const libc::iovec, usize, *mut *mut libc::c_void, *mut usize) -> i32;

/// Runs one of the C peers over `iovs` and owns what it mapped.
fn c_map(f: CMap, iovs: &[libc::iovec]) -> io::Result<Mapping> {
    let mut out = std::ptr::null_mut();
    let mut len = 0;
    // SAFETY: `f` is one of this crate's C peers (`naive.c`, `floor.c`): it reads the
    // `iovs.len()` iovecs of a valid slice, writes only `out`/`len`, and maps only where the
    // kernel chooses or into a reservation it creates itself.
    let r = unsafe { f(iovs.as_ptr(), iovs.len(), &mut out, &mut len) };
    if r < 0 {
        return Err(io::Error::from_raw_os_error(-r));
    }
    // SAFETY: on success the C code returned a mapping of `len` bytes that nothing else owns.
    Ok(unsafe { Mapping::from_raw(out.cast(), len) })
}

/// The naive loop: reserve, then one mremap clone per iovec. The result unmaps on drop.
pub fn naive_map(iovs: &[libc::iovec]) -> io::Result<Mapping> {
    c_map(iovmap_naive_map, iovs)
}

/// The floor: one pass over the list (coalescing adjacent iovecs, counting runs and
/// bytes), then one clone where the kernel chooses for a one-run list, or a reservation
/// and one clone per run. What a map call cannot go below; it checks nothing, so only
/// page-aligned lists of cloneable memory. The result unmaps on drop.
pub fn floor_map(iovs: &[libc::iovec]) -> io::Result<Mapping> {
    c_map(iovmap_floor_map, iovs)
}

/// The fd arena: reserve, then `mmap(MAP_SHARED | MAP_FIXED)` of `fd` for each piece,
/// given as `(file offset, length)` with page-aligned offsets.
pub fn fd_arena(fd: BorrowedFd<'_>, pieces: &[(u64, usize)]) -> io::Result<Mapping> {
    let page = iovmap_testkit::page();
    let total: usize = pieces.iter().map(|p| p.1.next_multiple_of(page)).sum();
    let arena =
        Mapping::new(total, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, None, 0)?;
    let mut cursor = arena.ptr();
    for &(offset, len) in pieces {
        // SAFETY: `cursor` lies in the arena reserved above, which this function owns;
        // MAP_FIXED replaces only its PROT_NONE pages. On error the arena is dropped.
        let p = unsafe {
            libc::mmap(
                cursor.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        cursor = cursor.wrapping_add(len.next_multiple_of(page));
    }
    Ok(arena)
}

/// Copies every iovec, in order, into `dst` (which must hold their total length).
/// Returns the bytes copied.
///
/// # Safety
/// Every iovec must describe readable memory that is not written meanwhile.
pub unsafe fn bounce_copy(iovs: &[libc::iovec], dst: &mut [u8]) -> usize {
    let mut at = 0;
    for iov in iovs {
        assert!(at + iov.iov_len <= dst.len(), "bounce buffer too small");
        // SAFETY: the source is readable (caller's contract); `dst` has room (asserted).
        unsafe { std::ptr::copy_nonoverlapping(iov.iov_base as *const u8, dst.as_mut_ptr().add(at), iov.iov_len) };
        at += iov.iov_len;
    }
    at
}

/// The bytes of `iovs`, concatenated: the reference a view must equal.
///
/// # Safety
/// As [`bounce_copy`].
pub unsafe fn gather(iovs: &[libc::iovec]) -> Vec<u8> {
    let mut v = vec![0u8; iovs.iter().map(|i| i.iov_len).sum()];
    // SAFETY: forwarded to the caller's contract.
    unsafe { bounce_copy(iovs, &mut v) };
    v
}

/// The syscall floors iovmap's targets are measured against.
pub mod floor {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd};
    use std::time::{Duration, Instant};

    use iovmap_testkit::Mapping;

    fn reserve(len: usize) -> io::Result<Mapping> {
        Mapping::new(len, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, None, 0)
    }

    /// One reservation, one clone of `[src, src + len)` into it, one munmap: the least a
    /// view of a single iovec can cost.
    pub fn reserve_clone_unmap(src: *const u8, len: usize) -> io::Result<()> {
        let slot = reserve(len)?;
        // SAFETY: the destination is the reservation made just above, owned here; the
        // clone replaces its PROT_NONE pages and is unmapped with it.
        let r = unsafe {
            libc::mremap(
                src as *mut libc::c_void,
                0,
                len,
                libc::MREMAP_FIXED | libc::MREMAP_MAYMOVE,
                slot.ptr().cast::<libc::c_void>(),
            )
        };
        if r == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        drop(slot);
        Ok(())
    }

    /// Clones each page in `srcs` into consecutive pages of a reservation and returns the
    /// time spent in the clones alone (the reservation and the unmap are not counted).
    /// Pages that are not file-adjacent never merge, so each clone is one new VMA: the
    /// per-run cost of a scattered list.
    pub fn timed_clones(srcs: &[*const u8], page: usize) -> io::Result<Duration> {
        let slots = reserve(srcs.len() * page)?;
        let t = Instant::now();
        for (i, &src) in srcs.iter().enumerate() {
            let dst = slots.ptr().wrapping_add(i * page);
            // SAFETY: `dst` is a page of the reservation owned here.
            let r = unsafe {
                libc::mremap(
                    src as *mut libc::c_void,
                    0,
                    page,
                    libc::MREMAP_FIXED | libc::MREMAP_MAYMOVE,
                    dst.cast::<libc::c_void>(),
                )
            };
            if r == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(t.elapsed())
    }

    /// Maps page `offsets` of `fd` into consecutive pages of a reservation with
    /// MAP_FIXED and returns the time spent in the mmaps alone.
    pub fn timed_fd_maps(fd: BorrowedFd<'_>, offsets: &[u64], page: usize) -> io::Result<Duration> {
        let slots = reserve(offsets.len() * page)?;
        let t = Instant::now();
        for (i, &off) in offsets.iter().enumerate() {
            let dst = slots.ptr().wrapping_add(i * page);
            // SAFETY: `dst` is a page of the reservation owned here.
            let r = unsafe {
                libc::mmap(
                    dst.cast(),
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    fd.as_raw_fd(),
                    off as libc::off_t,
                )
            };
            if r == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(t.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iovmap_testkit::GuestRam;

    #[test]
    fn the_floor_maps_what_the_naive_loop_maps() {
        let page = iovmap_testkit::page();
        let ram = GuestRam::new(32 * page).unwrap();
        ram.fill(9);
        // One run of 8 adjacent pages (one clone where the kernel chooses), and 3 runs.
        let one: Vec<_> = (4..12).map(|p| ram.iov(p * page, page)).collect();
        let three =
            [ram.iov(20 * page, 2 * page), ram.iov(3 * page, page), ram.iov(4 * page, page), ram.iov(9 * page, page)];
        for list in [&one[..], &three[..]] {
            let (f, n) = (floor_map(list).unwrap(), naive_map(list).unwrap());
            assert_eq!(f.len(), n.len());
            // SAFETY: two live mappings of `len` bytes each.
            assert_eq!(unsafe { iovmap_testkit::first_difference(f.ptr(), n.ptr(), f.len()) }, None);
        }
    }
}
