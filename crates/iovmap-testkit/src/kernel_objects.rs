//! Kernel objects whose mappings refuse the clone: the stand-ins for device memory.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::{Mapping, Unavailable, page};

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd returned by the kernel that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A perf_event ring buffer (PERF_COUNT_SW_DUMMY): VmFlags `pf io de`, the VM_PFNMAP
/// stand-in for a vfio-pci BAR. Its fd can only map the whole ring at offset 0; page 0
/// (the control page) is writable, the data pages SIGBUS on a user write.
pub struct PerfRing {
    /// The ring mapping.
    pub map: Mapping,
    fd: OwnedFd,
}

impl PerfRing {
    /// A ring of 1 + `data_pages` pages (`data_pages` a power of two).
    pub fn new(data_pages: usize) -> Result<Self, Unavailable> {
        // struct perf_event_attr, PERF_ATTR_SIZE_VER0 (64 bytes): type, size, config,
        // then the flag bits at byte 40.
        let mut attr = [0u8; 64];
        attr[0..4].copy_from_slice(&1u32.to_ne_bytes()); // PERF_TYPE_SOFTWARE
        attr[4..8].copy_from_slice(&64u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&9u64.to_ne_bytes()); // PERF_COUNT_SW_DUMMY
        let flags: u64 = 1 | 1 << 5 | 1 << 6; // disabled, exclude_kernel, exclude_hv
        attr[40..48].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: `attr` is a valid perf_event_attr of the size it declares.
        let fd = unsafe {
            libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), 0, -1, -1, 8 /* CLOEXEC */)
        };
        let fd = owned(fd).map_err(|e| {
            Unavailable(format!("perf_event_open(PERF_COUNT_SW_DUMMY) failed: {e} (kernel.perf_event_paranoid?)"))
        })?;
        let len = (1 + data_pages) * page();
        let map = Mapping::new(len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, Some(fd.as_fd()), 0)
            .map_err(|e| Unavailable(format!("mmap of a perf ring failed: {e}")))?;
        Ok(PerfRing { map, fd })
    }

    /// The perf fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A BPF_F_MMAPABLE array map: VmFlags `de` (VM_DONTEXPAND, clone refused with EFAULT),
/// mappable at any page offset, writable: the stand-in for partial, scattered device runs.
/// Needs CAP_BPF (root).
pub struct BpfArray {
    /// The array's mapping.
    pub map: Mapping,
    fd: OwnedFd,
}

impl BpfArray {
    /// An array of `pages` pages.
    pub fn new(pages: usize) -> Result<Self, Unavailable> {
        // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries,
        // map_flags, then fields left zero.
        let mut attr = [0u32; 32];
        attr[0] = 2; // BPF_MAP_TYPE_ARRAY
        attr[1] = 4;
        attr[2] = 8;
        attr[3] = u32::try_from(pages * page() / 8).map_err(|_| Unavailable("array too large".into()))?;
        attr[4] = 1 << 10; // BPF_F_MMAPABLE
        let create = || {
            // SAFETY: `attr` is a zero-padded bpf_attr of the size passed.
            owned(unsafe {
                libc::syscall(libc::SYS_bpf, 0 /* BPF_MAP_CREATE */, attr.as_ptr(), std::mem::size_of_val(&attr))
            })
        };
        // Before Linux 5.11, BPF maps are charged to RLIMIT_MEMLOCK (EPERM past it, as root
        // too): raise it as libbpf does, and try again.
        let fd = create().or_else(|e| match e.raw_os_error() {
            Some(libc::EPERM) if raise_memlock() => create(),
            _ => Err(e),
        });
        let fd = fd.map_err(|e| {
            Unavailable(format!(
                "bpf(BPF_MAP_CREATE, BPF_F_MMAPABLE) failed: {e} (needs CAP_BPF, and RLIMIT_MEMLOCK before 5.11)"
            ))
        })?;
        let map =
            Mapping::new(pages * page(), libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, Some(fd.as_fd()), 0)
                .map_err(|e| Unavailable(format!("mmap of a BPF array failed: {e}")))?;
        Ok(BpfArray { map, fd })
    }

    /// The map fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An io_uring submission-queue ring: VM_DONTEXPAND (clone refused) and its fd refuses
/// MAP_FIXED (EINVAL): memory with no way into a view.
pub struct IoUringSq {
    /// The SQ ring mapping.
    pub map: Mapping,
    fd: OwnedFd,
}

impl IoUringSq {
    /// A ring of 4 entries.
    pub fn new() -> Result<Self, Unavailable> {
        // struct io_uring_params: 10 u32 fields, then io_sqring_offsets (head, tail,
        // ring_mask, ring_entries, flags, dropped, array, resv1, user_addr: u64) and
        // io_cqring_offsets, 120 bytes in all.
        let mut params = [0u32; 30];
        // SAFETY: `params` is a zeroed io_uring_params.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
        let fd =
            owned(fd).map_err(|e| Unavailable(format!("io_uring_setup failed: {e} (kernel.io_uring_disabled?)")))?;
        let sq_entries = params[0] as usize;
        let array_off = params[10 + 6] as usize;
        let len = (array_off + 4 * sq_entries).next_multiple_of(page());
        let map = Mapping::new(len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, Some(fd.as_fd()), 0)
            .map_err(|e| Unavailable(format!("mmap of the io_uring SQ ring failed: {e}")))?;
        Ok(IoUringSq { map, fd })
    }

    /// The ring fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Whether the ring fd refuses a MAP_FIXED mapping (EINVAL), as Linux 6.1 and later
    /// do; 5.10 accepts it, and a view can then be mapped from the fd. Measured by
    /// mapping the ring into a reservation of our own.
    pub fn refuses_map_fixed(&self) -> bool {
        let len = self.map.len();
        let Ok(res) = Mapping::new(len, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None, 0) else {
            return true;
        };
        // SAFETY: MAP_FIXED over our own reservation, which `res` unmaps on drop whatever
        // is placed there.
        let p = unsafe {
            libc::mmap(
                res.ptr().cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.fd.as_raw_fd(),
                0,
            )
        };
        p == libc::MAP_FAILED
    }
}

/// Raises RLIMIT_MEMLOCK to unlimited (root only); whether it could.
fn raise_memlock() -> bool {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads a valid struct rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) == 0 }
}
