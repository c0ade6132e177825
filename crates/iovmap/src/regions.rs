//! The table of registered regions: host ranges whose backing fd and offset the caller
//! told iovmap, so that runs the kernel will not clone can be mapped from the fd.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::strategy::Clonability;
use crate::udmabuf::KernelBuiltError;

/// A file as the kernel names it: its device and inode.
///
/// ```
/// let id = iovmap::FileId::new(0, 1, 2052);
/// assert_eq!((id.major(), id.minor(), id.ino), (0, 1, 2052));
/// assert_eq!(id.to_string(), "00:01 inode 2052");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FileId {
    /// The file's device as `major << 32 | minor`, the way /proc/self/maps and
    /// PROCMAP_QUERY name it, so that an id from `fstat` and one from a VMA compare.
    pub dev: u64,
    /// The inode number.
    pub ino: u64,
}

impl FileId {
    /// The id of the file on device `major:minor` with inode `ino`.
    ///
    /// ```
    /// assert_eq!(iovmap::FileId::new(8, 1, 7).dev, 8 << 32 | 1);
    /// ```
    pub const fn new(major: u32, minor: u32, ino: u64) -> Self {
        FileId { dev: (major as u64) << 32 | minor as u64, ino }
    }

    /// The id of a file from its `fstat` (`st_dev` as glibc encodes it, `st_ino`).
    pub(crate) fn from_stat(st_dev: u64, st_ino: u64) -> Self {
        FileId::new(libc::major(st_dev), libc::minor(st_dev), st_ino)
    }

    /// The device's major number.
    ///
    /// ```
    /// assert_eq!(iovmap::FileId::new(8, 1, 7).major(), 8);
    /// ```
    pub const fn major(&self) -> u32 {
        (self.dev >> 32) as u32
    }

    /// The device's minor number.
    ///
    /// ```
    /// assert_eq!(iovmap::FileId::new(8, 1, 7).minor(), 1);
    /// ```
    pub const fn minor(&self) -> u32 {
        self.dev as u32
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == FileId::default() {
            return f.write_str("no file (private anonymous memory)");
        }
        write!(f, "{:02x}:{:02x} inode {}", self.major(), self.minor(), self.ino)
    }
}

/// The name of one registration: what [`Remapper::register`](crate::Remapper::register)
/// returns and [`Remapper::unregister`](crate::Remapper::unregister) takes. A vfio region
/// registered with its sparse areas is one registration.
///
/// ```
/// # use std::os::fd::FromRawFd;
/// # let file = unsafe { std::fs::File::from_raw_fd(libc::memfd_create(c"doc".as_ptr(), libc::MFD_CLOEXEC)) };
/// # let page = iovmap::page_size();
/// # file.set_len(2 * page as u64).unwrap();
/// # let addr = unsafe { libc::mmap(std::ptr::null_mut(), 2 * page, libc::PROT_READ,
/// #     libc::MAP_SHARED, std::os::fd::AsRawFd::as_raw_fd(&file), 0) } as *const u8;
/// let mut remapper = iovmap::Remapper::new();
/// let a = remapper.register(addr, page, &file, 0)?;
/// let b = remapper.register(addr.wrapping_add(page), page, &file, page as u64)?;
/// assert_ne!(a, b);
/// assert_eq!(remapper.regions().map(|r| r.id).collect::<Vec<_>>(), [a, b]);
/// # unsafe { libc::munmap(addr as *mut _, 2 * page) };
/// # Ok::<(), iovmap::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub(crate) u64);

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region #{}", self.0)
    }
}

/// What the planner knows of a registered region: pure data, no fd.
///
/// ```
/// use iovmap::plan::RegionSpan;
/// let bar = RegionSpan { start: 0x7000_0000, end: 0x7100_0000, offset: 0x200_0000_0000,
///                        page_size: 4096, ..RegionSpan::default() };
/// assert_eq!(bar.offset_of(0x7000_3000), 0x200_0000_3000);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpan {
    /// Host address of the region's first byte (page aligned).
    pub start: usize,
    /// One past its last byte.
    pub end: usize,
    /// Offset in the file of the byte at `start`.
    pub offset: u64,
    /// Which file the fd refers to, for coalescing: two regions' runs on the same file at
    /// contiguous offsets can be placed by one fd mapping. Anonymous-inode files (which
    /// all share one inode) get an identity of their own per registration.
    pub file: FileId,
    /// Page size of the file's mappings (huge page size on hugetlbfs).
    pub page_size: usize,
    /// False for a hole of a device region that must never be in a view (a vfio
    /// sparse-mmap gap such as an MSI-X table): a segment there is refused.
    pub mappable: bool,
    /// The file the kernel reported mapped at `start` when the region was registered.
    pub mapped_file: FileId,
    /// The file offset the kernel reported for `start` then. It is `offset` for files
    /// (the registration checks it); device drivers may report something else (vfio-pci
    /// on Linux 6.1 reports the BAR's physical address), so what was seen is kept.
    pub mapped_offset: u64,
    /// The registration the region belongs to.
    pub id: RegionId,
    /// Whether udmabuf takes ranges of its fd (a memfd with F_SEAL_SHRINK and without
    /// F_SEAL_WRITE): its runs may be kernel-built.
    pub kernel_built: bool,
}

impl Default for RegionSpan {
    fn default() -> Self {
        RegionSpan {
            start: 0,
            end: 0,
            offset: 0,
            file: FileId::default(),
            page_size: 4096,
            mappable: true,
            mapped_file: FileId::default(),
            mapped_offset: 0,
            id: RegionId(0),
            kernel_built: false,
        }
    }
}

impl RegionSpan {
    /// The file offset of host address `addr`, which must lie in the region.
    ///
    /// ```
    /// # use iovmap::plan::RegionSpan;
    /// let r = RegionSpan { start: 0x1000, end: 0x5000, offset: 0x10000, ..RegionSpan::default() };
    /// assert_eq!(r.offset_of(0x1800), 0x10800);
    /// ```
    #[inline]
    pub fn offset_of(&self, addr: usize) -> u64 {
        self.offset + (addr - self.start) as u64
    }

    /// Whether the kernel's VMA `vma`, which covers `addr` in the region, still maps what
    /// was registered there: the same file at the same (reported) offset.
    ///
    /// ```
    /// # use iovmap::plan::{RegionSpan, Vma};
    /// # use iovmap::FileId;
    /// let file = FileId::new(0, 1, 7);
    /// let r = RegionSpan { start: 0x1000, end: 0x5000, offset: 0x10000, mapped_file: file,
    ///                      mapped_offset: 0x10000, ..RegionSpan::default() };
    /// let vma = Vma { start: 0x1000, end: 0x5000, offset: 0x10000, file, ..Vma::default() };
    /// assert!(r.still_maps(&vma, 0x2000));
    /// assert!(!r.still_maps(&Vma { offset: 0, ..vma }, 0x2000));
    /// ```
    #[inline]
    pub fn still_maps(&self, vma: &crate::vma::Vma, addr: usize) -> bool {
        let seen = vma.offset.wrapping_add((addr - vma.start) as u64);
        let registered = self.mapped_offset.wrapping_add((addr - self.start) as u64);
        vma.file == self.mapped_file && seen == registered
    }
}

/// What iovmap keeps for a registered region besides its span.
#[derive(Debug)]
pub(crate) struct RegionState {
    /// The duplicated fd; `None` for a hole.
    fd: Option<OwnedFd>,
    /// Why udmabuf would not take the fd's ranges, if it would not (what
    /// `RegionSpan::kernel_built` says, with the reason for errors).
    pub(crate) kernel_built: Result<(), KernelBuiltError>,
    /// What is known about cloning the region's mapping ([`Clonability`] as stored by
    /// [`Clonability::to_raw`]), learned by any map call and kept for later ones.
    clone: AtomicI32,
    /// For an area of a vfio-pci region: which region, for dma-buf export.
    pub(crate) vfio: Option<VfioRegion>,
}

/// The vfio-pci region an area of a registration belongs to: its index and the fd offset
/// of its first byte (`VfioRegionInfo::offset`), from which dma-buf ranges are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct VfioRegion {
    pub(crate) index: u32,
    pub(crate) offset: u64,
}

impl RegionState {
    pub(crate) fn new(
        fd: Option<OwnedFd>,
        kernel_built: Result<(), KernelBuiltError>,
        vfio: Option<VfioRegion>,
    ) -> Self {
        RegionState { fd, kernel_built, clone: AtomicI32::new(Clonability::Unknown.to_raw()), vfio }
    }

    /// The fd; the planner never gives a hole a run, so a hole has none to give.
    pub(crate) fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    pub(crate) fn clonability(&self) -> Clonability {
        Clonability::from_raw(self.clone.load(Ordering::Relaxed))
    }

    /// Remembers, for later runs and later map calls, what a clone of the region's
    /// mapping gave.
    pub(crate) fn learn(&self, known: Clonability) {
        self.clone.store(known.to_raw(), Ordering::Relaxed);
    }
}

/// Registered regions, sorted by address and never overlapping: the spans the planner
/// reads as a plain slice, and beside each (same index) its fd and what was learned.
#[derive(Debug, Default)]
pub(crate) struct Regions {
    spans: Vec<RegionSpan>,
    state: Vec<RegionState>,
    last_id: u64,
}

impl Regions {
    pub(crate) const fn new() -> Self {
        Regions { spans: Vec::new(), state: Vec::new(), last_id: 0 }
    }

    /// A fresh registration id.
    pub(crate) fn new_id(&mut self) -> RegionId {
        self.last_id += 1;
        RegionId(self.last_id)
    }

    pub(crate) fn spans(&self) -> &[RegionSpan] {
        &self.spans
    }

    pub(crate) fn state(&self, index: usize) -> &RegionState {
        &self.state[index]
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.spans.len()
    }

    /// The registered region overlapping `[start, end)`, if any.
    pub(crate) fn overlapping(&self, start: usize, end: usize) -> Option<&RegionSpan> {
        let i = self.spans.partition_point(|s| s.end <= start);
        self.spans.get(i).filter(|s| s.start < end)
    }

    /// Inserts a region that overlaps none of the others.
    pub(crate) fn insert(&mut self, span: RegionSpan, state: RegionState) {
        debug_assert!(self.overlapping(span.start, span.end).is_none());
        debug_assert_eq!(span.mappable, state.fd.is_some());
        let i = self.spans.partition_point(|s| s.start < span.start);
        self.spans.insert(i, span);
        self.state.insert(i, state);
    }

    /// Removes every region of registration `id`. Returns how many regions went.
    pub(crate) fn remove(&mut self, id: RegionId) -> usize {
        let before = self.spans.len();
        let mut keep = self.spans.iter().map(|s| s.id != id);
        self.state.retain(|_| keep.next().unwrap_or(true));
        self.spans.retain(|s| s.id != id);
        before - self.spans.len()
    }
}

/// Finds the registered region containing `addr` in a sorted span table, or else the
/// unregistered gap that `addr` lies in. Returns `(index, window_start, window_end)`: the
/// bounds of that region or gap.
#[inline]
pub(crate) fn region_window(spans: &[RegionSpan], addr: usize) -> (Option<usize>, usize, usize) {
    let i = spans.partition_point(|s| s.start <= addr);
    match i.checked_sub(1) {
        Some(j) if addr < spans[j].end => (Some(j), spans[j].start, spans[j].end),
        prev => (None, prev.map_or(0, |j| spans[j].end), spans.get(i).map_or(usize::MAX, |s| s.start)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: usize, end: usize, id: u64) -> RegionSpan {
        RegionSpan { start, end, id: RegionId(id), ..RegionSpan::default() }
    }

    fn fd() -> Option<OwnedFd> {
        Some(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
    }

    #[test]
    fn windows_cover_regions_and_gaps() {
        let spans = [span(0x1000, 0x3000, 1), span(0x5000, 0x6000, 2)];
        assert_eq!(region_window(&spans, 0), (None, 0, 0x1000));
        assert_eq!(region_window(&spans, 0x1000), (Some(0), 0x1000, 0x3000));
        assert_eq!(region_window(&spans, 0x2fff), (Some(0), 0x1000, 0x3000));
        assert_eq!(region_window(&spans, 0x3000), (None, 0x3000, 0x5000));
        assert_eq!(region_window(&spans, 0x5800), (Some(1), 0x5000, 0x6000));
        assert_eq!(region_window(&spans, 0x6000), (None, 0x6000, usize::MAX));
        assert_eq!(region_window(&[], 42), (None, 0, usize::MAX));
    }

    #[test]
    fn overlap_is_detected_on_either_side() {
        let mut r = Regions::new();
        let a = r.new_id();
        r.insert(span(0x4000, 0x8000, a.0), RegionState::new(fd(), Err(KernelBuiltError::NotMemfd), None));
        assert!(r.overlapping(0x3000, 0x4001).is_some());
        assert!(r.overlapping(0x7fff, 0x9000).is_some());
        assert!(r.overlapping(0x5000, 0x6000).is_some());
        assert!(r.overlapping(0x3000, 0x9000).is_some());
        assert!(r.overlapping(0x3000, 0x4000).is_none());
        assert!(r.overlapping(0x8000, 0x9000).is_none());
        let b = r.new_id();
        r.insert(span(0x1000, 0x2000, b.0), RegionState::new(fd(), Err(KernelBuiltError::NotMemfd), None));
        assert_eq!(r.spans()[0].start, 0x1000);
        assert_eq!(r.remove(RegionId(99)), 0);
        assert_eq!(r.remove(a), 1);
        assert_eq!(r.len(), 1);
        assert_eq!(r.spans()[0].id, b);
    }

    #[test]
    fn a_registration_is_removed_whole_and_state_stays_beside_its_span() {
        let mut r = Regions::new();
        let bar = r.new_id();
        r.insert(span(0x10000, 0x12000, bar.0), RegionState::new(fd(), Err(KernelBuiltError::NotMemfd), None));
        r.insert(
            RegionSpan { mappable: false, ..span(0x12000, 0x13000, bar.0) },
            RegionState::new(None, Err(KernelBuiltError::NotMemfd), None),
        );
        r.insert(span(0x13000, 0x20000, bar.0), RegionState::new(fd(), Err(KernelBuiltError::NotMemfd), None));
        let other = r.new_id();
        r.insert(span(0x30000, 0x31000, other.0), RegionState::new(fd(), Err(KernelBuiltError::NotMemfd), None));
        r.state(3).learn(Clonability::Refused(libc::EFAULT));
        assert_eq!(r.remove(bar), 3);
        assert_eq!(r.spans().iter().map(|s| s.start).collect::<Vec<_>>(), [0x30000]);
        assert_eq!(r.state(0).clonability(), Clonability::Refused(libc::EFAULT));
    }
}
