//! [`Remapper`]: the registered table and the entry points that build views.

use std::os::fd::{AsFd, BorrowedFd};

use crate::dmabuf::DmaBufs;
use crate::error::{Error, Operation, RegionContext, RegionError};
use crate::options::{MapOptions, Placement};
use crate::plan::{self, Plan, VmaSource};
use crate::regions::{FileId, RegionId, RegionSpan, RegionState, Regions, VfioRegion};
use crate::udmabuf::{self, KernelBuiltError};
use crate::view::View;
use crate::vma::ProcessVmas;
use crate::{holes, place, sys};

/// Builds contiguous views of iovec lists, with the fds of the memory the kernel will
/// not clone.
///
/// Register the regions whose mappings the kernel refuses to clone (vfio-pci BARs,
/// hugetlbfs RAM, sealed mappings) with [`Remapper::register`]; everything shared and
/// cloneable (memfd, shmem, shared anonymous memory) needs no registration. A `Remapper`
/// is `Send + Sync`: one can serve many threads, which map through `&self`.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // Guest RAM: a memfd of 16 pages, mapped shared.
/// let page = iovmap::page_size();
/// let ram_fd = memfd::create("guest-ram", 16 * page)?;
/// let ram = unsafe {
///     libc::mmap(std::ptr::null_mut(), 16 * page, libc::PROT_READ | libc::PROT_WRITE,
///                libc::MAP_SHARED, std::os::fd::AsRawFd::as_raw_fd(&ram_fd), 0)
/// } as *mut u8;
/// unsafe { ram.add(5 * page).write(42) };
///
/// let mut remapper = iovmap::Remapper::new();
/// // Registration is only needed where the clone is refused, but it never hurts.
/// let id = remapper.register(ram, 16 * page, &ram_fd, 0)?;
/// let iov = [libc::iovec { iov_base: unsafe { ram.add(5 * page) }.cast(), iov_len: 2 * page }];
/// let view = remapper.map(&iov)?;
/// assert_eq!(unsafe { view.as_ptr().read_volatile() }, 42);
/// assert_eq!(view.stats().runs, 1);
/// remapper.unregister(id)?; // before the VMM unmaps or replaces that memory
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

/// One registered region, as [`Remapper::regions`] lists it.
///
/// ```
/// # use std::os::fd::FromRawFd;
/// # let file = unsafe { std::fs::File::from_raw_fd(libc::memfd_create(c"doc".as_ptr(), libc::MFD_CLOEXEC)) };
/// # let page = iovmap::page_size();
/// # file.set_len(4 * page as u64).unwrap();
/// # let addr = unsafe { libc::mmap(std::ptr::null_mut(), 2 * page, libc::PROT_READ,
/// #     libc::MAP_SHARED, std::os::fd::AsRawFd::as_raw_fd(&file), 2 * page as libc::off_t) } as *const u8;
/// let mut remapper = iovmap::Remapper::new();
/// let id = remapper.register(addr, 2 * page, &file, 2 * page as u64)?;
/// let r = remapper.regions().next().unwrap();
/// assert_eq!((r.id, r.addr, r.len, r.offset, r.page_size), (id, addr, 2 * page, 2 * page as u64, page));
/// # unsafe { libc::munmap(addr as *mut _, 2 * page) };
/// # Ok::<(), iovmap::Error>(())
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegisteredRegion {
    /// The registration it belongs to (a vfio region registers one region per mmappable
    /// area, all with one id).
    pub id: RegionId,
    /// Host address of its first byte.
    pub addr: *const u8,
    /// Its length in bytes.
    pub len: usize,
    /// The fd offset of its first byte.
    pub offset: u64,
    /// The page size of its mapping (the huge page size on hugetlbfs).
    pub page_size: usize,
}

impl Remapper {
    /// An empty remapper: nothing registered.
    ///
    /// ```
    /// let remapper = iovmap::Remapper::new();
    /// assert_eq!(remapper.regions().count(), 0);
    /// ```
    pub fn new() -> Self {
        Remapper { regions: Regions::new() }
    }

    /// Declares that the `len` bytes mapped at `addr` are the file `fd` from `offset`,
    /// contiguously, so runs there that the kernel will not clone can be mapped from the
    /// fd. The fd is duplicated (close-on-exec) and kept until [`Remapper::unregister`]
    /// or drop. Returns the registration's id.
    ///
    /// The range must be mapped, shared, and aligned (address, length and offset) to its
    /// page size: the base page, or the huge page size of a hugetlbfs file. A file with a
    /// size (memfd, regular file, hugetlbfs) must hold `offset + len` bytes; device fds
    /// (vfio, perf) report no size and are not checked.
    ///
    /// # What is verified, and what the caller must do
    /// The kernel's VMAs over the range must map the fd's file (same device and inode),
    /// and, for regular files, memfds and hugetlbfs files, at `offset`: a wrong fd (a
    /// pipe, another file) or a wrong offset is refused. Every later map checks that the
    /// VMAs still map what was seen here, and refuses a segment whose memory was replaced
    /// ([`Error::StaleRegion`]). Two things cannot be told apart: device drivers may
    /// report another offset than the fd's (vfio-pci on Linux 6.1 reports the BAR's
    /// physical address), so for device fds the offset is taken on trust and only its
    /// stability is checked; and all anonymous-inode files (vfio group-mode device fds,
    /// perf events, BPF maps) share one inode, so such a mapping replaced by another
    /// anonymous-inode mapping at the same reported offset looks unchanged. So: unregister
    /// a region before you unmap its memory (memory hot-unplug, a remapped RAMBlock), and
    /// register the new mapping afterwards.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let file = tempfile()?;
    /// let page = iovmap::page_size();
    /// file.set_len(2 * page as u64)?;
    /// let addr = unsafe {
    ///     libc::mmap(std::ptr::null_mut(), 2 * page, libc::PROT_READ | libc::PROT_WRITE,
    ///                libc::MAP_SHARED, std::os::fd::AsRawFd::as_raw_fd(&file), 0)
    /// } as *const u8;
    /// let mut remapper = iovmap::Remapper::new();
    /// let id = remapper.register(addr, 2 * page, &file, 0)?;
    /// // Overlapping ranges, other files and wrong offsets are refused.
    /// assert!(remapper.register(addr, page, &file, 0).is_err());
    /// let other = tempfile()?;
    /// remapper.unregister(id)?;
    /// assert!(remapper.register(addr, page, &other, 0).is_err());
    /// assert!(remapper.register(addr, page, &file, page as u64).is_err());
    /// # unsafe { libc::munmap(addr as *mut _, 2 * page) };
    /// # Ok(()) }
    /// # fn tempfile() -> std::io::Result<std::fs::File> {
    /// #     let fd = unsafe { libc::memfd_create(c"doc".as_ptr(), libc::MFD_CLOEXEC) };
    /// #     if fd < 0 { return Err(std::io::Error::last_os_error()) }
    /// #     Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidRegion`] with a [`RegionError`] naming what is wrong: zero or
    /// unaligned length, address or offset; overlap with a registered region; a file
    /// shorter than `offset + len`; a range that is not mapped, is private, or maps
    /// another file or offset than `fd` and `offset`. Nothing is registered then.
    pub fn register(&mut self, addr: *const u8, len: usize, fd: impl AsFd, offset: u64) -> Result<RegionId, Error> {
        let fd = fd.as_fd();
        let context = RegionContext::Register;
        let span =
            self.check_region(addr as usize, len, fd, offset, &mut ProcessVmas::new(), anon_file_id(), context)?;
        self.commit(&[(span, Some(fd))], context, None)
    }

    /// Validates a registration and returns its span (with a placeholder id: `commit`
    /// gives it the registration's). `anon` is the file identity to give the region if its
    /// fd is an anonymous-inode file, whose `(st_dev, st_ino)` every other such file shares
    /// (see [`anon_file_id`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check_region(
        &self,
        start: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        offset: u64,
        vmas: &mut dyn VmaSource,
        anon: FileId,
        context: RegionContext,
    ) -> Result<RegionSpan, Error> {
        let invalid = |kind: RegionError| Error::InvalidRegion { addr: start, len, offset, context, kind };
        if len == 0 {
            return Err(invalid(RegionError::Empty));
        }
        let end = start.checked_add(len).ok_or_else(|| invalid(RegionError::Wraps))?;
        let file_end = offset
            .checked_add(len as u64)
            .filter(|e| i64::try_from(*e).is_ok())
            .ok_or_else(|| invalid(RegionError::OffsetOverflow))?;
        let info = sys::file_info(fd).map_err(|source| invalid(RegionError::Os { op: Operation::FileStat, source }))?;
        // Every page size is a multiple of the base page: check that first, before the
        // lookups, and the mapping's own page size (huge pages) once it is known.
        let aligned = |page: usize| start & (page - 1) == 0 && len & (page - 1) == 0 && offset & (page as u64 - 1) == 0;
        if !aligned(sys::page_size()) {
            return Err(invalid(RegionError::Unaligned { page_size: sys::page_size() }));
        }
        let fd_file = FileId::from_stat(info.dev, info.ino);
        // The range must be mapped, shared, and map the fd's file; its page size is the
        // largest the kernel or the file reports.
        let mut page_size = info.huge_page.unwrap_or(sys::page_size());
        let mut mapped_offset = None;
        let mut at = start;
        while at < end {
            let vma = vmas
                .vma_at(at)
                .map_err(|source| invalid(RegionError::Os { op: Operation::VmaQuery, source }))?
                .filter(|v| v.contains(at))
                .ok_or_else(|| invalid(RegionError::NotMapped { at }))?;
            if !vma.shared {
                return Err(invalid(RegionError::Private { at }));
            }
            if vma.file != fd_file {
                return Err(invalid(RegionError::NotTheFile { at, mapped: vma.file, fd: fd_file }));
            }
            // The file offset the kernel reports for `at`. Files report the real one, which
            // must be the registered one; device drivers report what they choose, which
            // must at least continue across the range's VMAs.
            let seen = vma.offset.wrapping_add((at - vma.start) as u64);
            let first = *mapped_offset.get_or_insert(seen);
            let want = if info.sized { offset + (at - start) as u64 } else { first.wrapping_add((at - start) as u64) };
            if seen != want {
                return Err(invalid(RegionError::WrongOffset { at, mapped: seen, registered: want }));
            }
            page_size = page_size.max(vma.page_size);
            at = vma.end;
        }
        // After the identity checks: a wrong fd is named as such, not as a short file.
        if info.sized && info.size < file_end {
            return Err(invalid(RegionError::FileTooShort { size: info.size, needed: file_end }));
        }
        if !aligned(page_size) {
            return Err(invalid(RegionError::Unaligned { page_size }));
        }
        Ok(RegionSpan {
            start,
            end,
            offset,
            file: if info.anon_inode { anon } else { fd_file },
            page_size,
            mappable: true,
            mapped_file: fd_file,
            mapped_offset: mapped_offset.unwrap_or(offset),
            id: RegionId(0),
            kernel_built: udmabuf::eligibility(fd).is_ok(),
        })
    }

    /// Registers checked spans as one registration: every path that registers (this
    /// module's `register`, the vfio and vm-memory adapters) ends here. Each span comes
    /// with its fd (`None` for a hole of a device region). Checks overlaps, duplicates the
    /// fds, then inserts: on error nothing is registered and no fd is kept.
    pub(crate) fn commit(
        &mut self,
        spans: &[(RegionSpan, Option<BorrowedFd<'_>>)],
        context: RegionContext,
        vfio: Option<VfioRegion>,
    ) -> Result<RegionId, Error> {
        let invalid = |s: &RegionSpan, kind: RegionError| Error::InvalidRegion {
            addr: s.start,
            len: s.end - s.start,
            offset: s.offset,
            context,
            kind,
        };
        for (span, _) in spans {
            if let Some(other) = self.regions.overlapping(span.start, span.end) {
                return Err(invalid(span, RegionError::Overlap { start: other.start, end: other.end }));
            }
        }
        let mut states = Vec::with_capacity(spans.len());
        for (span, fd) in spans {
            let dup = fd
                .map(sys::dup_cloexec)
                .transpose()
                .map_err(|source| invalid(span, RegionError::Os { op: Operation::DupFd, source }))?;
            let kernel_built = match fd {
                Some(fd) => udmabuf::eligibility(*fd),
                None => Err(KernelBuiltError::NotMemfd),
            };
            states.push(RegionState::new(dup, kernel_built, vfio));
        }
        let id = self.regions.new_id();
        for ((span, _), state) in spans.iter().zip(states) {
            let span = RegionSpan { id, ..*span };
            holes::learn_at_registration(&span, &state);
            self.regions.insert(span, state);
        }
        Ok(id)
    }

    /// Forgets registration `id` (all the areas of a vfio region registered together) and
    /// closes its duplicated fds. Views already built keep working: their mappings hold
    /// the file. Call it before the memory it describes is unmapped or replaced.
    ///
    /// ```
    /// # use std::os::fd::FromRawFd;
    /// # fn main() -> Result<(), iovmap::Error> {
    /// # let file = unsafe { std::fs::File::from_raw_fd(libc::memfd_create(c"doc".as_ptr(), libc::MFD_CLOEXEC)) };
    /// # let page = iovmap::page_size();
    /// # file.set_len(page as u64).unwrap();
    /// # let addr = unsafe { libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ,
    /// #     libc::MAP_SHARED, std::os::fd::AsRawFd::as_raw_fd(&file), 0) } as *const u8;
    /// let mut remapper = iovmap::Remapper::new();
    /// let id = remapper.register(addr, page, &file, 0)?;
    /// remapper.unregister(id)?;
    /// assert!(matches!(remapper.unregister(id), Err(iovmap::Error::NotRegistered { .. })));
    /// # unsafe { libc::munmap(addr as *mut _, page) };
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::NotRegistered`] when nothing is registered as `id`.
    pub fn unregister(&mut self, id: RegionId) -> Result<(), Error> {
        if self.regions.remove(id) == 0 {
            return Err(Error::NotRegistered { id });
        }
        Ok(())
    }

    /// The registered regions in address order (the mmappable areas: the holes of a
    /// device region are not listed).
    ///
    /// ```
    /// assert_eq!(iovmap::Remapper::new().regions().count(), 0);
    /// ```
    pub fn regions(&self) -> impl Iterator<Item = RegisteredRegion> + '_ {
        self.regions.spans().iter().filter(|s| s.mappable).map(|s| RegisteredRegion {
            id: s.id,
            addr: s.start as *const u8,
            len: s.end - s.start,
            offset: s.offset,
            page_size: s.page_size,
        })
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
        self.map_with(iovs, MapOptions::new())
    }

    /// Maps `iovs` into one contiguous view, without copying.
    ///
    /// Zero-length segments are skipped. Adjacent segments that continue each other in
    /// one mapping (or one registered file) become one run. Every boundary between runs
    /// must be page-aligned on both sides; the first segment may start and the last may
    /// end mid-page. The view allows no more than each source mapping does, unless
    /// `opts` say [`MapOptions::raise_source_protection`].
    ///
    /// ```
    /// use iovmap::MapOptions;
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), 4 * page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
    /// let iov = [libc::iovec { iov_base: ram.cast(), iov_len: 2 * page }];
    /// let view = iovmap::Remapper::new().map_with(&iov, MapOptions::new().read_only().populate())?;
    /// assert_eq!(unsafe { view.as_ptr().read_volatile() }, 0);
    /// # drop(view);
    /// # unsafe { libc::munmap(ram.cast(), 4 * page) };
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    ///
    /// # Errors
    /// Any [`Error`]; nothing stays mapped and the registered table is unchanged.
    pub fn map_with(&self, iovs: &[libc::iovec], opts: MapOptions) -> Result<View, Error> {
        map_in(iovs, &self.regions, opts)
    }

    /// Builds the dma-bufs of `iovs`, with no CPU mapping: for VMMs that only pass guest
    /// memory on (to a GPU, a display, a video encoder, a peer device). Every segment must
    /// lie in a registered memfd udmabuf takes (F_SEAL_SHRINK set, F_SEAL_WRITE not), or
    /// in a vfio-pci region registered with `register_vfio_region(_info)`, whose runs
    /// vfio-pci exports (`VFIO_DEVICE_FEATURE_DMA_BUF`, Linux 6.19+, for peer-to-peer
    /// importers); all mapped writable (an importer may write the buffer). Consecutive
    /// memfd runs share udmabuf buffers (`list_limit` entries, `size_limit_mb`), consecutive
    /// runs of one BAR share an export (up to 1,024 ranges); the dma-bufs come in list
    /// order, so a list that fits one buffer gives one. The caller owns them: the kernel
    /// keeps their pages pinned until the last fd and mapping of each is gone.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), 4 * page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
    /// let iov = [libc::iovec { iov_base: ram.cast(), iov_len: page }];
    /// match iovmap::Remapper::new().dmabufs(&iov) {
    ///     Ok(bufs) => println!("{} dma-buf(s)", bufs.buffers().len()),
    ///     // Shared anonymous memory is no registered memfd: udmabuf cannot take it.
    ///     Err(e) => assert!(matches!(e, iovmap::Error::KernelBuilt { index: 0, reason: iovmap::KernelBuiltError::NotRegistered })),
    /// }
    /// # unsafe { libc::munmap(ram.cast(), 4 * page) };
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::KernelBuilt`] naming the first segment that cannot be made a dma-buf and
    /// why (not registered, not a memfd, not sealed, no `/dev/udmabuf`, refused; a BAR
    /// vfio-pci will not export), and the planning errors of [`Remapper::map_with`].
    /// Nothing is left open.
    pub fn dmabufs(&self, iovs: &[libc::iovec]) -> Result<DmaBufs, Error> {
        let plan = plan_for(iovs, &self.regions, Placement::KernelBuilt)?;
        place::dmabufs_of(&plan, iovs, &self.regions)
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
    #[cfg(feature = "unstable-internals")]
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
/// let len = 3 * iovmap::page_size();
/// let ram = unsafe {
///     libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
///                libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
/// } as *mut u8;
/// let iov = [libc::iovec { iov_base: ram.cast(), iov_len: len }];
/// let view = iovmap::map(&iov)?;
/// unsafe { view.as_mut_ptr().unwrap().add(100).write_volatile(7) };
/// assert_eq!(unsafe { ram.add(100).read() }, 7); // the view aliases the source
/// # drop(view);
/// # unsafe { libc::munmap(ram.cast(), len) };
/// # Ok(()) }
/// ```
pub fn map(iovs: &[libc::iovec]) -> Result<View, Error> {
    map_in(iovs, &NO_REGIONS, MapOptions::new())
}

fn map_in(iovs: &[libc::iovec], regions: &Regions, opts: MapOptions) -> Result<View, Error> {
    let plan = plan_for(iovs, regions, opts.placement())?;
    place::build(&plan, iovs, regions, opts)
}

/// Plans `iovs` for a placement policy. A kernel-built view lays runs of memfds udmabuf
/// takes out at the base page (`plan::plan_for_kernel_built`); so does automatic placement
/// when the plain plan fails on pieces of huge-page RAM smaller than a huge page, which
/// only udmabuf can map, and udmabuf is there.
pub(crate) fn plan_for(iovs: &[libc::iovec], regions: &Regions, placement: Placement) -> Result<Plan, Error> {
    let (spans, page) = (regions.spans(), sys::page_size());
    match placement {
        Placement::KernelBuilt => plan::plan_for_kernel_built(iovs, &mut ProcessVmas::new(), spans, page),
        Placement::RemapOnly => plan::plan(iovs, &mut ProcessVmas::new(), spans, page),
        Placement::Automatic => match plan::plan(iovs, &mut ProcessVmas::new(), spans, page) {
            Err(e @ Error::Unaligned { .. }) => {
                let huge_memfd = spans.iter().any(|s| s.kernel_built && s.page_size > page);
                if !huge_memfd || !place::udmabuf_present() {
                    return Err(e);
                }
                plan::plan_for_kernel_built(iovs, &mut ProcessVmas::new(), spans, page)
            }
            other => other,
        },
    }
}

/// A file identity of its own for the regions of one registration whose fd is an
/// anonymous-inode file (BPF maps, perf events, io_uring, vfio group-mode device fds):
/// they all share one `(st_dev, st_ino)`, so two devices' regions would otherwise look like
/// one file and coalesce by offset. No real file has `st_dev` `u64::MAX`.
pub(crate) fn anon_file_id() -> FileId {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    FileId { dev: u64::MAX, ino: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) }
}
