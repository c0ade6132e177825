//! [`Remapper`]: the registered table and the entry points that build views.

use std::os::fd::BorrowedFd;

use crate::error::Error;
use crate::options::MapOptions;
use crate::plan::{self, Plan, VmaSource};
use crate::regions::{FileId, Region, RegionSpan, Regions};
use crate::view::View;
use crate::vma::ProcessVmas;
use crate::{holes, place, sys};

/// Builds contiguous views of iovec lists, with the fds of the memory the kernel will
/// not clone.
///
/// Register the regions whose mappings the kernel refuses to clone (vfio-pci BARs,
/// hugetlbfs RAM) with [`Remapper::register`]; everything shared and cloneable (memfd,
/// shmem, shared anonymous memory) needs no registration. A `Remapper` is `Send + Sync`:
/// one can serve many threads, which map through `&self`.
///
/// ```
/// use std::os::fd::AsFd;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // Guest RAM: a memfd of 16 pages, mapped shared.
/// let page = 4096;
/// let ram_fd = memfd::create("guest-ram", 16 * page)?;
/// let ram = unsafe {
///     libc::mmap(std::ptr::null_mut(), 16 * page, libc::PROT_READ | libc::PROT_WRITE,
///                libc::MAP_SHARED, std::os::fd::AsRawFd::as_raw_fd(&ram_fd), 0)
/// } as *mut u8;
/// unsafe { ram.add(5 * page).write(42) };
///
/// let mut remapper = iovmap::Remapper::new();
/// // Registration is only needed where the clone is refused, but it never hurts.
/// remapper.register(ram, 16 * page, ram_fd.as_fd(), 0)?;
/// let iov = [libc::iovec { iov_base: unsafe { ram.add(5 * page) }.cast(), iov_len: 2 * page }];
/// let view = remapper.map(&iov)?;
/// assert_eq!(unsafe { view.as_ptr().read_volatile() }, 42);
/// assert_eq!(view.stats().runs, 1);
/// # drop(view);
/// # unsafe { libc::munmap(ram.cast(), 16 * page) };
/// # Ok(()) }
/// # mod memfd {
/// #     use std::os::fd::{FromRawFd, OwnedFd};
/// #     pub fn create(name: &str, len: usize) -> std::io::Result<OwnedFd> {
/// #         let name = std::ffi::CString::new(name).unwrap();
/// #         let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
/// #         if fd < 0 { return Err(std::io::Error::last_os_error()); }
/// #         let fd = unsafe { OwnedFd::from_raw_fd(fd) };
/// #         std::fs::File::from(fd.try_clone()?).set_len(len as u64)?;
/// #         Ok(fd)
/// #     }
/// # }
/// ```
#[derive(Debug, Default)]
pub struct Remapper {
    pub(crate) regions: Regions,
}

/// Nothing registered: what the free [`map`](crate::map) function uses.
static NO_REGIONS: Regions = Regions::new();

impl Remapper {
    /// An empty remapper: nothing registered.
    ///
    /// ```
    /// let remapper = iovmap::Remapper::new();
    /// # let _ = remapper;
    /// ```
    pub fn new() -> Self {
        Remapper { regions: Regions::new() }
    }

    /// Declares that the `len` bytes mapped at `addr` are the file `fd` from `offset`,
    /// contiguously, so runs there that the kernel will not clone can be mapped from the
    /// fd. The fd is duplicated (close-on-exec) and kept until [`Remapper::unregister`]
    /// or drop.
    ///
    /// The range must be mapped, shared, and aligned (address, length and offset) to its
    /// page size: 4 KiB, or the huge page size of a hugetlbfs file. A file with a size
    /// (memfd, regular file, hugetlbfs) must hold `offset + len` bytes; device fds
    /// (vfio, perf) report no size and are not checked.
    ///
    /// ```
    /// # use std::os::fd::AsFd;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let file = std::fs::File::from(std::os::fd::OwnedFd::from(tempfile()?));
    /// file.set_len(8192)?;
    /// let addr = unsafe {
    ///     libc::mmap(std::ptr::null_mut(), 8192, libc::PROT_READ | libc::PROT_WRITE,
    ///                libc::MAP_SHARED, std::os::fd::AsRawFd::as_raw_fd(&file), 0)
    /// } as *const u8;
    /// let mut remapper = iovmap::Remapper::new();
    /// remapper.register(addr, 8192, file.as_fd(), 0)?;
    /// // Overlapping ranges are refused.
    /// assert!(remapper.register(addr, 4096, file.as_fd(), 0).is_err());
    /// remapper.unregister(addr)?;
    /// # unsafe { libc::munmap(addr as *mut _, 8192) };
    /// # Ok(()) }
    /// # fn tempfile() -> std::io::Result<std::fs::File> {
    /// #     let fd = unsafe { libc::memfd_create(c"doc".as_ptr(), libc::MFD_CLOEXEC) };
    /// #     if fd < 0 { return Err(std::io::Error::last_os_error()) }
    /// #     Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidRegion`] naming what is wrong: zero or unaligned length, address or
    /// offset; overlap with a registered region; a file shorter than `offset + len`; a
    /// range that is not mapped or is private.
    pub fn register(&mut self, addr: *const u8, len: usize, fd: BorrowedFd<'_>, offset: u64) -> Result<(), Error> {
        let span = self.check_region(addr as usize, len, fd, offset, &mut ProcessVmas::new(), anon_file_id())?;
        let dup = sys::dup_cloexec(fd).map_err(|e| invalid(format!("cannot duplicate the fd: {e}")))?;
        let group = self.regions.new_group();
        let region = Region::new(span, Some(dup), group);
        holes::learn_at_registration(&region);
        self.regions.insert(region);
        Ok(())
    }

    /// Validates a registration and returns its span. `anon` is the file identity to give
    /// the region if its fd is an anonymous-inode file, whose `(st_dev, st_ino)` every other
    /// such file shares (see [`anon_file_id`]).
    pub(crate) fn check_region(
        &self,
        start: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        offset: u64,
        vmas: &mut dyn VmaSource,
        anon: FileId,
    ) -> Result<RegionSpan, Error> {
        let what = || format!("[{start:#x}, +{len:#x}) at fd offset {offset:#x}");
        if len == 0 {
            return Err(invalid(format!("{} has length 0: register at least one page", what())));
        }
        let end = start.checked_add(len).ok_or_else(|| invalid(format!("{} wraps the address space", what())))?;
        let file_end = offset
            .checked_add(len as u64)
            .filter(|e| i64::try_from(*e).is_ok())
            .ok_or_else(|| invalid(format!("{}: offset + len overflows a file offset", what())))?;
        let info = sys::file_info(fd).map_err(|e| invalid(format!("{}: fstat of the fd failed: {e}", what())))?;
        if info.sized && info.size < file_end {
            return Err(invalid(format!(
                "{}: the file is only {:#x} bytes, shorter than offset + len = {file_end:#x} (accesses past its \
                 end would SIGBUS): grow the file or register a shorter range",
                what(),
                info.size
            )));
        }
        if let Some(other) = self.regions.overlapping(start, end) {
            return Err(invalid(format!(
                "{} overlaps the region [{:#x}, {:#x}) registered earlier: unregister it first",
                what(),
                other.start,
                other.end
            )));
        }
        // The range must be mapped and shared; its page size is the largest the kernel or
        // the file reports.
        let mut page_size = info.huge_page.unwrap_or(sys::page_size());
        let mut at = start;
        while at < end {
            let vma = vmas
                .vma_at(at)
                .map_err(|e| invalid(format!("{}: VMA lookup failed: {e}", what())))?
                .filter(|v| v.contains(at))
                .ok_or_else(|| {
                    invalid(format!("{}: {at:#x} is not mapped; map the range before registering it", what()))
                })?;
            if !vma.shared {
                return Err(invalid(format!(
                    "{}: {at:#x} is a private mapping; a fd cannot stand in for its copied-on-write pages",
                    what()
                )));
            }
            page_size = page_size.max(vma.page_size);
            at = vma.end;
        }
        let mask = page_size - 1;
        if start & mask != 0 || len & mask != 0 || offset & mask as u64 != 0 {
            return Err(invalid(format!(
                "{} is not aligned to the mapping's page size ({page_size:#x}): address, length and offset \
                 must all be multiples of it",
                what()
            )));
        }
        let file = if info.anon_inode { anon } else { FileId::from_stat(info.dev, info.ino) };
        Ok(RegionSpan { start, end, offset, file, page_size, mappable: true })
    }

    /// Forgets the registration made at `addr` (the address given to
    /// [`Remapper::register`], or to `register_vfio_region`, which forgets all the areas
    /// of that region) and closes the duplicated fds. Views already built keep working:
    /// their mappings hold the file.
    ///
    /// ```
    /// # use std::os::fd::{AsFd, FromRawFd};
    /// # fn main() -> Result<(), iovmap::Error> {
    /// # let file = unsafe { std::fs::File::from_raw_fd(libc::memfd_create(c"doc".as_ptr(), libc::MFD_CLOEXEC)) };
    /// # file.set_len(4096).unwrap();
    /// # let addr = unsafe { libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ,
    /// #     libc::MAP_SHARED, std::os::fd::AsRawFd::as_raw_fd(&file), 0) } as *const u8;
    /// let mut remapper = iovmap::Remapper::new();
    /// remapper.register(addr, 4096, file.as_fd(), 0)?;
    /// remapper.unregister(addr)?;
    /// assert!(remapper.unregister(addr).is_err()); // nothing registered there any more
    /// # unsafe { libc::munmap(addr as *mut _, 4096) };
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidRegion`] when no region starts at `addr`.
    pub fn unregister(&mut self, addr: *const u8) -> Result<(), Error> {
        if self.regions.remove(addr as usize) == 0 {
            return Err(invalid(format!(
                "no region is registered at {:#x}: pass the address given to register",
                addr as usize
            )));
        }
        Ok(())
    }

    /// The registered regions in address order, as `(address, length, fd offset)`.
    ///
    /// ```
    /// assert_eq!(iovmap::Remapper::new().regions().count(), 0);
    /// ```
    pub fn regions(&self) -> impl Iterator<Item = (*const u8, usize, u64)> + '_ {
        self.regions.spans().iter().filter(|s| s.mappable).map(|s| (s.start as *const u8, s.end - s.start, s.offset))
    }

    /// Maps `iovs` into one contiguous read-write view. See [`Remapper::map_with`].
    ///
    /// ```
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), 4 * page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
    /// let iov = [libc::iovec { iov_base: ram.cast(), iov_len: 4 * page }];
    /// let view = iovmap::Remapper::new().map(&iov)?;
    /// assert_eq!(view.len(), 4 * page);
    /// # drop(view);
    /// # unsafe { libc::munmap(ram.cast(), 4 * page) };
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    pub fn map(&self, iovs: &[libc::iovec]) -> Result<View, Error> {
        self.map_with(iovs, &MapOptions::default())
    }

    /// Maps `iovs` into one contiguous view, without copying.
    ///
    /// Zero-length segments are skipped. Adjacent segments that continue each other in
    /// one mapping (or one registered file) become one run. Every boundary between runs
    /// must be page-aligned on both sides; the first segment may start and the last may
    /// end mid-page.
    ///
    /// ```
    /// use iovmap::{Access, MapOptions};
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), 4 * page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
    /// let iov = [libc::iovec { iov_base: ram.cast(), iov_len: 2 * page }];
    /// let opts = MapOptions { access: Access::ReadOnly, populate: true };
    /// let view = iovmap::Remapper::new().map_with(&iov, &opts)?;
    /// assert_eq!(unsafe { view.as_ptr().read_volatile() }, 0);
    /// # drop(view);
    /// # unsafe { libc::munmap(ram.cast(), 4 * page) };
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    ///
    /// # Errors
    /// Any [`Error`]; nothing stays mapped and the registered table is unchanged.
    pub fn map_with(&self, iovs: &[libc::iovec], opts: &MapOptions) -> Result<View, Error> {
        map_in(iovs, &self.regions, opts)
    }

    /// Plans a view of `iovs` without mapping anything: the runs it would take, which
    /// is how many VMAs it would cost. Costs one VMA lookup per mapping touched.
    ///
    /// ```
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), 4 * page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
    /// let iov = |p: usize, n: usize| libc::iovec { iov_base: unsafe { ram.add(p * page) }.cast(), iov_len: n * page };
    /// let plan = iovmap::Remapper::new().plan(&[iov(0, 1), iov(1, 1), iov(3, 1)])?;
    /// assert_eq!(plan.runs.len(), 2); // pages 0-1, then page 3
    /// # unsafe { libc::munmap(ram.cast(), 4 * page) };
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`Remapper::map_with`], for the checks made before placement.
    pub fn plan(&self, iovs: &[libc::iovec]) -> Result<Plan, Error> {
        plan::plan(iovs, &mut ProcessVmas::new(), self.regions.spans(), sys::page_size())
    }
}

/// Maps `iovs` into one contiguous read-write view, with nothing registered.
///
/// Equivalent to `Remapper::new().map(iovs)`: every run must be clonable (shared
/// memfd, shmem or anonymous memory).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let len = 3 * 4096;
/// let ram = unsafe {
///     libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
///                libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
/// } as *mut u8;
/// let iov = [libc::iovec { iov_base: ram.cast(), iov_len: len }];
/// let view = iovmap::map(&iov)?;
/// unsafe { view.as_ptr().add(100).write_volatile(7) };
/// assert_eq!(unsafe { ram.add(100).read() }, 7); // the view aliases the source
/// # drop(view);
/// # unsafe { libc::munmap(ram.cast(), len) };
/// # Ok(()) }
/// ```
pub fn map(iovs: &[libc::iovec]) -> Result<View, Error> {
    map_in(iovs, &NO_REGIONS, &MapOptions::default())
}

fn map_in(iovs: &[libc::iovec], regions: &Regions, opts: &MapOptions) -> Result<View, Error> {
    let plan = plan::plan(iovs, &mut ProcessVmas::new(), regions.spans(), sys::page_size())?;
    place::build(&plan, regions, opts)
}

/// A file identity of its own for the regions of one registration whose fd is an
/// anonymous-inode file (BPF maps, perf events, io_uring, vfio group-mode device fds):
/// they all share one `(st_dev, st_ino)`, so two devices' regions would otherwise look like
/// one file and coalesce by offset. No real file has `st_dev` `u64::MAX`.
pub(crate) fn anon_file_id() -> FileId {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    FileId { dev: u64::MAX, ino: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) }
}

fn invalid(reason: String) -> Error {
    Error::InvalidRegion { reason }
}
