//! Real kernel objects for iovmap's tests, benchmarks, demo and fuzzers.
//!
//! Every fixture is the real thing, not a model: memfd and hugetlb guest RAM, shared and
//! private anonymous memory, a private file mapping, a perf_event ring buffer (VmFlags
//! `pf io de`: the VM_PFNMAP stand-in for a vfio-pci BAR), a BPF_F_MMAPABLE array
//! (VM_DONTEXPAND, mappable at any page offset), an io_uring SQ ring (refuses MAP_FIXED).
//! A fixture this machine cannot provide returns [`Unavailable`] with the reason, which
//! tests print when they skip (see [`skip!`]).

#![warn(clippy::undocumented_unsafe_blocks)]

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use memmap2::{MmapOptions, MmapRaw};

mod counts;
mod kernel_objects;
pub mod monitor;
pub mod workloads;

pub use counts::{Counts, count_fds, count_vmas, has_procmap_query, process_lock, run_counting_checks, vma_flags};
pub use kernel_objects::{BpfArray, IoUringSq, PerfRing};

/// The base page size.
pub fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// 2 MiB, the huge page size of the hugetlb fixtures.
pub const HUGE_2M: usize = 2 << 20;

/// Why a fixture cannot be had on this machine.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// Prints why a test is skipped (visible in `cargo test` output) and returns from it.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {{
        eprintln!("SKIP {}: {}", module_path!(), format_args!($($arg)*));
        return;
    }};
}

/// An address nothing is mapped at: page 1, below `vm.mmap_min_addr`, which mmap never
/// hands out unless asked with MAP_FIXED. (An address freed by munmap is no good: the
/// kernel gives it to the next mapping of that size, possibly another test's.)
pub fn unmapped_address() -> *const u8 {
    page() as *const u8
}

/// The errno at the bottom of an error's chain of sources, if there is one.
pub fn errno_of(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return io.raw_os_error();
        }
        cur = err.source();
    }
    None
}

/// Reads one byte of every page of `[p, p + len)`, the first touch a consumer makes of a
/// view, and returns their sum (for `black_box`, so the reads are not optimised away).
///
/// ```
/// let page = iovmap_testkit::page();
/// let buf = vec![1u8; 3 * page];
/// // SAFETY: `buf` is live and readable.
/// assert_eq!(unsafe { iovmap_testkit::touch_pages(buf.as_ptr(), buf.len()) }, 3);
/// ```
///
/// # Safety
/// `[p, p + len)` must be readable memory (a live view or mapping) for the whole call.
pub unsafe fn touch_pages(p: *const u8, len: usize) -> u64 {
    // SAFETY: every offset is below `len` (caller's contract).
    (0..len).step_by(page()).map(|o| u64::from(unsafe { p.add(o).read_volatile() })).sum()
}

/// An iovec of `len` bytes at `ptr`.
pub fn iov(ptr: *const u8, len: usize) -> libc::iovec {
    libc::iovec { iov_base: ptr as *mut libc::c_void, iov_len: len }
}

/// The deterministic byte a fixture filled with `seed` holds at `offset`.
#[inline]
pub fn pattern(seed: u64, offset: usize) -> u8 {
    (pattern_word(seed, offset & !7) >> (8 * (offset & 7))) as u8
}

/// Fills `len` bytes at `ptr` with `pattern(seed, base_offset + i)`, a word at a time
/// where it can (the demo fills a GiB).
///
/// # Safety
/// `[ptr, ptr + len)` must be writable memory that nothing else accesses meanwhile.
pub unsafe fn fill(ptr: *mut u8, len: usize, seed: u64, base_offset: usize) {
    // SAFETY: forwarded to the caller's contract.
    let s = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    let mut i = 0;
    // Bytes until the fill offset is a multiple of 8, then whole words, then the tail.
    while i < len && (base_offset + i) % 8 != 0 {
        s[i] = pattern(seed, base_offset + i);
        i += 1;
    }
    let words = (len - i) / 8;
    for (w, chunk) in s[i..i + 8 * words].chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&pattern_word(seed, base_offset + i + 8 * w).to_le_bytes());
    }
    let tail = i + 8 * words;
    for (j, b) in s[tail..].iter_mut().enumerate() {
        *b = pattern(seed, base_offset + tail + j);
    }
}

/// Fills `buf` with `pattern(seed, base_offset + i)`.
pub fn fill_slice(buf: &mut [u8], seed: u64, base_offset: usize) {
    // SAFETY: `buf` is writable for its length and borrowed exclusively.
    unsafe { fill(buf.as_mut_ptr(), buf.len(), seed, base_offset) }
}

/// The 8 pattern bytes at `offset` (a multiple of 8), as a little-endian word.
#[inline]
fn pattern_word(seed: u64, offset: usize) -> u64 {
    let x = (offset as u64 >> 3).wrapping_add(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Compares `len` bytes at `a` and `b`; returns the first offset that differs.
///
/// # Safety
/// Both ranges must be readable for `len` bytes, and not written meanwhile.
pub unsafe fn first_difference(a: *const u8, b: *const u8, len: usize) -> Option<usize> {
    // SAFETY: forwarded to the caller's contract.
    let (x, y) = unsafe { (std::slice::from_raw_parts(a, len), std::slice::from_raw_parts(b, len)) };
    if x == y { None } else { x.iter().zip(y).position(|(p, q)| p != q) }
}

/// Creates a memfd (close-on-exec) with extra `flags`.
pub fn memfd(name: &str, flags: libc::c_uint) -> io::Result<File> {
    let name = std::ffi::CString::new(name).expect("no NUL in fixture names");
    // SAFETY: valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags | libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A mapping made with raw mmap, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value; only raw pointers are handed out.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `mmap(NULL, len, prot, flags, fd, offset)`.
    pub fn new(len: usize, prot: i32, flags: i32, fd: Option<BorrowedFd<'_>>, offset: u64) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        let raw = fd.map_or(-1, |f| f.as_raw_fd());
        // SAFETY: NULL address without MAP_FIXED: the kernel picks free space, so no
        // existing mapping is affected. The result is checked.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, raw, offset as libc::off_t) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// Takes ownership of a mapping made elsewhere.
    ///
    /// # Safety
    /// `[ptr, ptr + len)` must be a mapping that nothing else will unmap.
    pub unsafe fn from_raw(ptr: *mut u8, len: usize) -> Self {
        Mapping { ptr, len }
    }

    /// Shared anonymous memory, read-write: cloneable, with no fd.
    pub fn anon_shared(len: usize) -> io::Result<Self> {
        Self::new(len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_ANONYMOUS, None, 0)
    }

    /// Private anonymous memory, read-write: cannot be aliased.
    pub fn anon_private(len: usize) -> io::Result<Self> {
        Self::new(len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None, 0)
    }

    /// First byte.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping has length 0 (never, for a successful mmap).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// An iovec of `len` bytes at offset `off`.
    pub fn iov(&self, off: usize, len: usize) -> libc::iovec {
        assert!(off + len <= self.len, "iovec past the end of the fixture");
        iov(self.ptr.wrapping_add(off), len)
    }

    /// Unmaps now (the address range becomes free for anyone).
    pub fn unmap(self) {}
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `new` and is owned by this value.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Guest RAM: a memfd (or 2 MiB hugetlb memfd) mapped MAP_SHARED read-write.
pub struct GuestRam {
    file: File,
    map: MmapRaw,
    page_size: usize,
}

impl GuestRam {
    /// `len` bytes of memfd RAM (rounded up to whole pages), zeroed.
    pub fn new(len: usize) -> io::Result<Self> {
        let len = len.next_multiple_of(page());
        let file = memfd("iovmap-guest-ram", 0)?;
        file.set_len(len as u64)?;
        let map = MmapOptions::new().len(len).map_raw(&file)?;
        Ok(GuestRam { file, map, page_size: page() })
    }

    /// `len` bytes of memfd RAM sealed as QEMU's memory-backend-memfd seals guest RAM
    /// (F_SEAL_GROW, F_SEAL_SHRINK, F_SEAL_SEAL): what udmabuf takes.
    pub fn sealed(len: usize) -> io::Result<Self> {
        let len = len.next_multiple_of(page());
        let file = memfd("iovmap-sealed-ram", libc::MFD_ALLOW_SEALING)?;
        file.set_len(len as u64)?;
        seal_like_qemu(&file)?;
        let map = MmapOptions::new().len(len).map_raw(&file)?;
        Ok(GuestRam { file, map, page_size: page() })
    }

    /// [`GuestRam::huge`], sealed as [`GuestRam::sealed`] is.
    pub fn huge_sealed(len: usize) -> Result<Self, Unavailable> {
        let ram = Self::huge_with(len, libc::MFD_ALLOW_SEALING)?;
        seal_like_qemu(&ram.file).map_err(|e| Unavailable(format!("sealing a hugetlb memfd failed: {e}")))?;
        Ok(ram)
    }

    /// `len` bytes (rounded up to 2 MiB) of a 2 MiB hugetlb memfd, prefaulted.
    pub fn huge(len: usize) -> Result<Self, Unavailable> {
        Self::huge_with(len, 0)
    }

    fn huge_with(len: usize, extra_flags: libc::c_uint) -> Result<Self, Unavailable> {
        let len = len.next_multiple_of(HUGE_2M);
        let free = free_huge_pages();
        if free * HUGE_2M < len {
            return Err(Unavailable(format!(
                "{} MiB of 2 MiB huge pages needed, {free} free (as root: echo 64 > /proc/sys/vm/nr_hugepages; .ci/run does)",
                len >> 20
            )));
        }
        let file = memfd("iovmap-huge-ram", libc::MFD_HUGETLB | libc::MFD_HUGE_2MB | extra_flags)
            .map_err(|e| Unavailable(format!("memfd_create(MFD_HUGETLB | MFD_HUGE_2MB) failed: {e}")))?;
        file.set_len(len as u64).map_err(|e| Unavailable(format!("ftruncate of a hugetlb memfd failed: {e}")))?;
        // hugetlb reserves the pages at mmap time, so a shortage (another process took
        // them meanwhile) fails here with ENOMEM rather than with SIGBUS later.
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|e| Unavailable(format!("mmap of {} MiB of huge pages failed: {e}", len >> 20)))?;
        Ok(GuestRam { file, map, page_size: HUGE_2M })
    }

    /// First byte.
    pub fn ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the RAM has length 0 (never).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Page size of the mapping.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The memfd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The memfd as a `File`.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// An iovec of `len` bytes at offset `off`.
    pub fn iov(&self, off: usize, len: usize) -> libc::iovec {
        assert!(off + len <= self.len(), "iovec past the end of the fixture");
        iov(self.ptr().wrapping_add(off), len)
    }

    /// Fills the whole RAM with `pattern(seed, offset)`. The pages are allocated in one
    /// MADV_POPULATE_WRITE first, which is several times faster than a fault per page.
    pub fn fill(&self, seed: u64) {
        // SAFETY: prefaulting our own mapping changes no contents.
        unsafe { libc::madvise(self.ptr().cast(), self.len(), libc::MADV_POPULATE_WRITE) };
        // SAFETY: the mapping is ours and writable; callers fill before sharing it.
        unsafe { fill(self.ptr(), self.len(), seed, 0) }
    }

    /// Reads the byte at `off` (volatile: views may write it).
    pub fn read(&self, off: usize) -> u8 {
        assert!(off < self.len());
        // SAFETY: in bounds of a live mapping.
        unsafe { self.ptr().add(off).read_volatile() }
    }

    /// Writes the byte at `off` (volatile).
    pub fn write(&self, off: usize, v: u8) {
        assert!(off < self.len());
        // SAFETY: in bounds of a live writable mapping.
        unsafe { self.ptr().add(off).write_volatile(v) }
    }
}

/// Seals a memfd against growing, shrinking and further seals, as QEMU does for guest RAM.
fn seal_like_qemu(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a live fd; the result is checked.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The signal a one-byte write at `addr` dies of, in a forked child (`None`: it did
/// not fault). Nothing is written in this process either way.
pub fn write_signal(addr: *const u8) -> Option<i32> {
    // SAFETY: the child only performs a volatile store and _exit, both async-signal-safe.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: the write may fault: that is what is being found out, in the child.
        unsafe {
            addr.cast_mut().write_volatile(1);
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status))
}

/// Whether this machine has /dev/udmabuf (kernel-built views), or why not.
pub fn udmabuf() -> Result<(), Unavailable> {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/udmabuf") {
        Ok(_) => Ok(()),
        Err(e) => Err(Unavailable(format!(
            "no usable /dev/udmabuf ({e}): this kernel lacks CONFIG_UDMABUF, as this project's 6.18 host does; \
             the newest rows of the guest matrix have it"
        ))),
    }
}

/// Seals `[ptr, ptr + len)` with mseal(2) (Linux 6.10+): the mapping can no longer be
/// unmapped, moved, resized or mprotected for the life of the process, so only seal
/// fixtures a test leaks on purpose. `Unavailable` where the kernel has no mseal.
pub fn mseal(ptr: *const u8, len: usize) -> Result<(), Unavailable> {
    // SAFETY: mseal only adds a seal to existing mappings; it never changes memory.
    let rc = unsafe { libc::syscall(libc::SYS_mseal, ptr as usize, len, 0usize) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    Err(Unavailable(match e.raw_os_error() {
        Some(libc::ENOSYS) => format!("this kernel has no mseal(2) (Linux 6.10+): {e}"),
        _ => format!("mseal failed: {e}"),
    }))
}

/// Free 2 MiB huge pages right now.
pub fn free_huge_pages() -> usize {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A MAP_PRIVATE mapping of a memfd (a private file mapping: cannot be aliased).
pub fn file_private(len: usize) -> io::Result<(File, Mapping)> {
    let file = memfd("iovmap-private-file", 0)?;
    file.set_len(len as u64)?;
    let m = Mapping::new(len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE, Some(file.as_fd()), 0)?;
    Ok((file, m))
}

/// A pipe (close-on-exec), as `(read end, write end)`: an fd that maps nothing.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Duplicates an fd as an `OwnedFd`.
pub fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn word_fill_matches_the_byte_pattern() {
        let mut buf = vec![0u8; 100];
        // SAFETY: a local buffer.
        unsafe { super::fill(buf.as_mut_ptr().add(3), 90, 5, 13) };
        for (i, b) in buf[3..93].iter().enumerate() {
            assert_eq!(*b, super::pattern(5, 13 + i));
        }
        assert_eq!((buf[2], buf[93]), (0, 0));
    }
}
