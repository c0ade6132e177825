//! Memory the tests use and look at: memfd guest RAM, what /proc says about this
//! process's mappings, and fault-free access to memory that may have been unmapped or
//! replaced under its owner (`process_vm_readv`/`writev` on this process: a bad address is
//! an error, not a SIGSEGV).

use std::io;

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

pub use iovmap_testkit::page;

/// Guest RAM as a VMM sets it up: a memfd mapped MAP_SHARED read-write (what the kernel
/// clones); the testkit's.
pub use iovmap_testkit::GuestRam as SharedRam;

/// Reads `buf.len()` bytes at `addr` of this process without touching them directly: an
/// unmapped address, or one mapped by a device (VM_IO/VM_PFNMAP, which cannot be pinned),
/// is an error (EFAULT) instead of a fault.
///
/// ```
/// let x = [7u8; 16];
/// let mut y = [0u8; 16];
/// iovmap_vmtest::mem::read_own(x.as_ptr() as usize, &mut y).unwrap();
/// assert_eq!(x, y);
/// assert!(iovmap_vmtest::mem::read_own(8, &mut y).is_err());
/// ```
pub fn read_own(addr: usize, buf: &mut [u8]) -> io::Result<()> {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as *mut _, iov_len: buf.len() };
    // SAFETY: `local` is our buffer, writable for its length; the kernel checks `remote`
    // and reports a bad address as an error instead of faulting.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    done(n, buf.len())
}

/// Writes `buf` at `addr` of this process without touching it directly (see [`read_own`]).
///
/// # Safety
/// Whatever is mapped at `addr` is overwritten: the caller must own it (the point is that
/// if it was unmapped or replaced by a device mapping meanwhile, this fails instead).
pub unsafe fn write_own(addr: usize, buf: &[u8]) -> io::Result<()> {
    let local = libc::iovec { iov_base: buf.as_ptr() as *mut _, iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as *mut _, iov_len: buf.len() };
    // SAFETY: `local` is readable for its length; the caller owns `remote`.
    let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
    done(n, buf.len())
}

fn done(n: isize, want: usize) -> io::Result<()> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else if n as usize != want {
        Err(io::Error::from_raw_os_error(libc::EFAULT))
    } else {
        Ok(())
    }
}

/// Whether any page of `[addr, addr + len)` is unmapped (`mincore` says ENOMEM).
///
/// ```
/// let p = iovmap_vmtest::mem::page();
/// let v = vec![0u8; 2 * p];
/// assert!(!iovmap_vmtest::mem::has_unmapped_page((v.as_ptr() as usize).next_multiple_of(p), p));
/// ```
pub fn has_unmapped_page(addr: usize, len: usize) -> bool {
    let p = page();
    let start = addr & !(p - 1);
    let pages = (addr + len - start).div_ceil(p);
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the range; mincore only reads the page tables.
    let r = unsafe { libc::mincore(start as *mut _, pages * p, vec.as_mut_ptr()) };
    r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOMEM)
}

/// `si_code` of a SIGSEGV for a write to a mapping that does not allow it.
pub const SEGV_ACCERR: i32 = 2;

static FAULT_PAGE: AtomicUsize = AtomicUsize::new(0);
static FAULT_CODE: AtomicI32 = AtomicI32::new(0);

/// Whether writing the byte at `addr` faults, and with which `si_code`
/// (`SEGV_ACCERR` = 2 for a write to a read-only mapping). The byte's own value is
/// written back, so nothing changes either way.
///
/// In-process, not in a forked child: vfio BAR mappings are VM_DONTCOPY and would be
/// missing in a child, which would fault for the wrong reason. A temporary SIGSEGV
/// handler makes the page writable so the write can complete, records the fault, and
/// the page gets its protection back (PROT_READ) afterwards. Process-wide signal
/// disposition: call it while no other thread can fault.
///
/// # Safety
/// `addr` must be mapped readable, and owned by the caller (its protection is changed
/// for the duration of the call).
pub unsafe fn write_faults(addr: *mut u8) -> io::Result<Option<i32>> {
    let p = page();
    let pg = addr as usize & !(p - 1);
    FAULT_PAGE.store(pg, Ordering::SeqCst);
    FAULT_CODE.store(0, Ordering::SeqCst);
    // SAFETY: a zeroed sigaction is valid (empty mask), filled in below; the handler only
    // makes async-signal-safe calls (mprotect, signal).
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe {
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = on_write_fault as *const () as usize;
        new.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut new.sa_mask);
        if libc::sigaction(libc::SIGSEGV, &new, &mut old) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: the caller vouches that `addr` is mapped readable; the same value goes back.
    unsafe {
        let b = addr.read_volatile();
        addr.write_volatile(b);
    }
    // SAFETY: restores the disposition saved above.
    unsafe { libc::sigaction(libc::SIGSEGV, &old, std::ptr::null_mut()) };
    FAULT_PAGE.store(0, Ordering::SeqCst);
    let code = FAULT_CODE.load(Ordering::SeqCst);
    if code == 0 {
        return Ok(None);
    }
    // SAFETY: the caller owns the page; the handler made it writable, this makes it
    // read-only again.
    if unsafe { libc::mprotect(pg as *mut _, p, libc::PROT_READ) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(code - 1))
}

extern "C" fn on_write_fault(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
    let pg = FAULT_PAGE.load(Ordering::SeqCst);
    let size = page();
    if pg != 0 && addr & !(size - 1) == pg {
        FAULT_CODE.store(code + 1, Ordering::SeqCst);
        // SAFETY: the page `write_faults` was asked about, owned by its caller; returning
        // retries the write, which now succeeds.
        unsafe { libc::mprotect(pg as *mut _, size, libc::PROT_READ | libc::PROT_WRITE) };
    } else {
        // Not the fault we provoked: let the retried access die the default way.
        // SAFETY: resetting a disposition is async-signal-safe.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
}

/// The number of mappings of this process (lines of /proc/self/maps).
pub fn vma_count() -> io::Result<usize> {
    Ok(std::fs::read_to_string("/proc/self/maps")?.lines().count())
}

/// The number of open fds of this process.
pub fn fd_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}

/// The `/proc/self/maps` line of the mapping containing `addr`, if any.
pub fn maps_line(addr: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find(|l| range_of(l).is_some_and(|(s, e)| (s..e).contains(&addr))).map(str::to_owned)
}

/// The VmFlags of the mapping containing `addr` (from /proc/self/smaps), e.g. `rd wr sh pf io de`.
pub fn vm_flags(addr: usize) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((s, e)) = range_of(line) {
            inside = (s..e).contains(&addr);
        } else if inside {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.trim().to_owned());
            }
        }
    }
    None
}

/// The `start-end` range of a maps/smaps header line.
fn range_of(line: &str) -> Option<(usize, usize)> {
    let (range, _) = line.split_once(' ')?;
    let (s, e) = range.split_once('-')?;
    Some((usize::from_str_radix(s, 16).ok()?, usize::from_str_radix(e, 16).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_memory_reads_and_writes_without_faulting() {
        let p = page();
        // SAFETY: a fresh private mapping, unmapped below.
        let m = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * p,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as usize;
        assert_ne!(m as *mut libc::c_void, libc::MAP_FAILED);
        let data = vec![0x5au8; 2 * p];
        // SAFETY: ours.
        unsafe { write_own(m, &data) }.unwrap();
        let mut back = vec![0u8; 2 * p];
        read_own(m, &mut back).unwrap();
        assert_eq!(back, data);
        assert!(!has_unmapped_page(m, 2 * p));
        // Unmap the second page: reading across it fails instead of faulting.
        // SAFETY: the second page of our mapping.
        unsafe { libc::munmap((m + p) as *mut _, p) };
        assert!(has_unmapped_page(m, 2 * p));
        assert_eq!(read_own(m, &mut back).unwrap_err().raw_os_error(), Some(libc::EFAULT));
        // SAFETY: ours.
        unsafe { libc::munmap(m as *mut _, p) };
    }

    #[test]
    fn a_write_to_a_read_only_page_faults_and_a_writable_one_does_not() {
        let ram = SharedRam::new(2 * page()).unwrap();
        // SAFETY: our own mapping; the second page becomes read-only.
        unsafe {
            ram.ptr().add(page() + 5).write(9);
            assert_eq!(libc::mprotect(ram.ptr().add(page()).cast(), page(), libc::PROT_READ), 0);
            assert_eq!(write_faults(ram.ptr().add(page() + 5)).unwrap(), Some(SEGV_ACCERR));
            assert_eq!(write_faults(ram.ptr().add(5)).unwrap(), None);
            assert_eq!(ram.ptr().add(page() + 5).read(), 9);
        }
        // Read-only again afterwards.
        assert!(maps_line(ram.ptr() as usize + page()).unwrap().contains(" r--s "));
    }

    #[test]
    fn maps_and_smaps_describe_a_shared_ram_mapping() {
        let ram = SharedRam::new(3 * page()).unwrap();
        let line = maps_line(ram.ptr() as usize + 100).unwrap();
        assert!(line.contains("rw-s") && line.contains("memfd:iovmap-guest-ram"), "{line}");
        let flags = vm_flags(ram.ptr() as usize).unwrap();
        assert!(flags.split(' ').any(|f| f == "sh"), "{flags}");
        assert!(vma_count().unwrap() > 1 && fd_count().unwrap() > 1);
    }
}
