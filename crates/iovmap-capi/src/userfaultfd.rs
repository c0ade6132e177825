//! Guest RAM a userfaultfd monitor owns, in C: register it through iovmap (or declare
//! the registrations the VMM makes itself), so that views wait for the monitor's pages and
//! never write behind a write-protecting monitor.

use std::ffi::{c_int, c_uint, c_void};

use iovmap_core::userfaultfd::{self, Modes};

use crate::error::{Failure, guard};
use crate::{IOVMAP_MAP_READ_ONLY, iov_slice, open_fd};

/// Userfaultfd mode: pages not present fault to the monitor (postcopy migration). The
/// value of `UFFDIO_REGISTER_MODE_MISSING`.
pub const IOVMAP_UFFD_MISSING: c_uint = 1 << 0;
/// Userfaultfd mode: writes to write-protected pages fault to the monitor (live
/// snapshot). The value of `UFFDIO_REGISTER_MODE_WP`.
pub const IOVMAP_UFFD_WP: c_uint = 1 << 1;
/// Userfaultfd mode: pages in the page cache but not mapped fault to the monitor
/// (snapshot restore from shmem or hugetlbfs). The value of `UFFDIO_REGISTER_MODE_MINOR`.
pub const IOVMAP_UFFD_MINOR: c_uint = 1 << 2;

/// The modes `modes` names, or the failure naming `function`'s bad argument.
fn modes_of(function: &str, modes: c_uint) -> Result<Modes, Failure> {
    match Modes::from_bits(u64::from(modes)) {
        Some(m) if !m.is_empty() => Ok(m),
        _ => Err(Failure::argument(
            function,
            format!("modes {modes:#x}: pass IOVMAP_UFFD_MISSING, IOVMAP_UFFD_WP, IOVMAP_UFFD_MINOR or a union of them"),
        )),
    }
}

/// The failure of a userfaultfd ioctl.
fn ioctl_failure(function: &str, op: &str, addr: *const c_void, len: usize, e: std::io::Error) -> Failure {
    Failure::os(function, format!("{op} of [{addr:p}, +{len:#x}) failed: {e}"))
}

/// Registers the `len` bytes at `addr` with the userfaultfd `uffd` in `modes`
/// (`IOVMAP_UFFD_*`, as `ioctl(uffd, UFFDIO_REGISTER)` takes them) and records them as
/// armed: from then on every `iovmap_map` and `iovmap_dmabufs_new` of that memory first
/// has the monitor place or approve the list's pages (MISSING, MINOR: they are faulted in
/// through `addr`'s mapping, which waits for the monitor), and refuses views that can
/// write where it write-protects (WP: `IOVMAP_E_WRITE_PROTECTED`). Writes the ioctls the
/// kernel allows on the range to `*ioctls` when it is not NULL.
///
/// Make maps of armed memory from threads other than the monitor's: a map waits for it.
///
/// Returns `IOVMAP_OK`, `IOVMAP_E_INVALID_ARGUMENT` (bad fd, no or unknown modes) or
/// `IOVMAP_E_OS` (the kernel refused: the message has its errno). Nothing is recorded
/// on error.
///
/// # Safety
/// `uffd` stays open during the call; `ioctls` is NULL or points to a writable
/// `uint64_t`. `addr` is only registered, never dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_uffd_register(
    uffd: c_int,
    addr: *mut c_void,
    len: usize,
    modes: c_uint,
    ioctls: *mut u64,
) -> c_int {
    const F: &str = "iovmap_uffd_register";
    guard(F, || {
        let modes = modes_of(F, modes)?;
        // SAFETY: the caller keeps `uffd` open during the call (contract).
        let fd = unsafe { open_fd(F, uffd) }?;
        let allowed = userfaultfd::register(fd, addr.cast_const().cast(), len, modes)
            .map_err(|e| ioctl_failure(F, "UFFDIO_REGISTER", addr, len, e))?;
        // SAFETY: NULL or a writable uint64_t (contract).
        if let Some(out) = unsafe { ioctls.as_mut() } {
            *out = allowed;
        }
        Ok(())
    })
}

/// Unregisters the `len` bytes at `addr` from the userfaultfd `uffd`
/// (`ioctl(uffd, UFFDIO_UNREGISTER)`) and forgets them as armed.
///
/// Returns `IOVMAP_OK`, `IOVMAP_E_INVALID_ARGUMENT` (bad fd) or `IOVMAP_E_OS` (the
/// kernel refused; the record is unchanged).
///
/// # Safety
/// `uffd` stays open during the call. `addr` is never dereferenced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_uffd_unregister(uffd: c_int, addr: *mut c_void, len: usize) -> c_int {
    const F: &str = "iovmap_uffd_unregister";
    guard(F, || {
        // SAFETY: the caller keeps `uffd` open during the call (contract).
        let fd = unsafe { open_fd(F, uffd) }?;
        userfaultfd::unregister(fd, addr.cast_const().cast(), len)
            .map_err(|e| ioctl_failure(F, "UFFDIO_UNREGISTER", addr, len, e))
    })
}

/// Records that the `len` bytes at `addr` are (about to be) registered with a
/// userfaultfd in `modes`, for a VMM that makes `UFFDIO_REGISTER` itself (QEMU's
/// postcopy and background snapshot): call it just before that ioctl, and
/// `iovmap_uffd_declare_disarmed` just after `UFFDIO_UNREGISTER`, so the record always
/// covers what the kernel has armed. Process-wide: every remapper consults it.
///
/// Returns `IOVMAP_OK` or `IOVMAP_E_INVALID_ARGUMENT` (no or unknown modes, an empty
/// or wrapping range).
#[unsafe(no_mangle)]
pub extern "C" fn iovmap_uffd_declare_armed(addr: *const c_void, len: usize, modes: c_uint) -> c_int {
    const F: &str = "iovmap_uffd_declare_armed";
    guard(F, || {
        let modes = modes_of(F, modes)?;
        check_range(F, addr, len)?;
        userfaultfd::declare_armed(addr.cast(), len, modes);
        Ok(())
    })
}

/// Forgets the `len` bytes at `addr` as armed: call it just after `UFFDIO_UNREGISTER`.
///
/// Returns `IOVMAP_OK` or `IOVMAP_E_INVALID_ARGUMENT` (an empty or wrapping range).
#[unsafe(no_mangle)]
pub extern "C" fn iovmap_uffd_declare_disarmed(addr: *const c_void, len: usize) -> c_int {
    const F: &str = "iovmap_uffd_declare_disarmed";
    guard(F, || {
        check_range(F, addr, len)?;
        userfaultfd::declare_disarmed(addr.cast(), len);
        Ok(())
    })
}

/// Has the monitor place or approve, now, every page of `iov` that lies in memory armed
/// MISSING or MINOR (registered through `iovmap_uffd_register` or declared), as
/// `iovmap_map` does before it makes a view: for guest memory the VMM hands on some other
/// way (a udmabuf it makes itself, a DMA mapping), whose pins ask no monitor. Without
/// `IOVMAP_MAP_READ_ONLY` in `flags`, memory a monitor write-protects is refused as a
/// read-write view would be (`IOVMAP_E_WRITE_PROTECTED`). Writes the bytes faulted in
/// through the monitor to `*resolved` when it is not NULL (0 when nothing is armed, which
/// costs one atomic load).
///
/// Returns `IOVMAP_OK`, `IOVMAP_E_INVALID_ARGUMENT` (NULL list, negative count, flags
/// other than `IOVMAP_MAP_READ_ONLY`), `IOVMAP_E_WRITE_PROTECTED`, or `IOVMAP_E_OS` (a
/// page could not be faulted in: the index names its iovec).
///
/// # Safety
/// `iov` points to `iovcnt` readable `struct iovec` (their memory is only faulted in, never
/// read by iovmap); `resolved` is NULL or points to a writable `uint64_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iovmap_uffd_resolve(
    iov: *const libc::iovec,
    iovcnt: c_int,
    flags: c_uint,
    resolved: *mut u64,
) -> c_int {
    const F: &str = "iovmap_uffd_resolve";
    guard(F, || {
        if flags & !IOVMAP_MAP_READ_ONLY != 0 {
            return Err(Failure::argument(F, format!("flags {flags:#x}: only IOVMAP_MAP_READ_ONLY applies")));
        }
        // SAFETY: `iov` points to `iovcnt` iovecs (contract); checked for NULL and sign.
        let list = unsafe { iov_slice(F, iov, iovcnt) }?;
        let access = if flags & IOVMAP_MAP_READ_ONLY != 0 {
            iovmap_core::Access::ReadOnly
        } else {
            iovmap_core::Access::ReadWrite
        };
        let bytes = userfaultfd::resolve(list, access)?;
        // SAFETY: NULL or a writable uint64_t (contract).
        if let Some(out) = unsafe { resolved.as_mut() } {
            *out = bytes as u64;
        }
        Ok(())
    })
}

fn check_range(function: &str, addr: *const c_void, len: usize) -> Result<(), Failure> {
    if len == 0 || (addr as usize).checked_add(len).is_none() {
        return Err(Failure::argument(function, format!("[{addr:p}, +{len:#x}) is empty or wraps")));
    }
    Ok(())
}
