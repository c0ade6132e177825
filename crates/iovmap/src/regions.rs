//! The table of registered regions: host ranges whose backing fd and offset the caller
//! told iovmap, so that runs the kernel will not clone can be mapped from the fd.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// Which file a region maps: runs of two regions on the same file at contiguous offsets
/// can be placed by one fd mapping.
///
/// ```
/// use iovmap::plan::FileId;
/// assert_ne!(FileId { dev: 1, ino: 2 }, FileId { dev: 1, ino: 3 });
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FileId {
    /// The file's device as `major << 32 | minor`, the way /proc/self/maps and
    /// PROCMAP_QUERY name it, so that an id from `fstat` and one from a VMA compare.
    pub dev: u64,
    /// `st_ino` of the file.
    pub ino: u64,
}

impl FileId {
    /// The id of the file on device `major:minor` with inode `ino`.
    pub(crate) fn new(major: u32, minor: u32, ino: u64) -> Self {
        FileId { dev: u64::from(major) << 32 | u64::from(minor), ino }
    }

    /// The id of a file from its `fstat` (`st_dev` as glibc encodes it, `st_ino`).
    pub(crate) fn from_stat(st_dev: u64, st_ino: u64) -> Self {
        FileId::new(libc::major(st_dev), libc::minor(st_dev), st_ino)
    }
}

/// What the planner knows of a registered region: pure data, no fd.
///
/// ```
/// use iovmap::plan::{FileId, RegionSpan};
/// let bar = RegionSpan { start: 0x7000_0000, end: 0x7100_0000, offset: 0x200_0000_0000,
///                        file: FileId::default(), page_size: 4096, mappable: true };
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
    /// The file the fd refers to.
    pub file: FileId,
    /// Page size of the file's mappings (huge page size on hugetlbfs).
    pub page_size: usize,
    /// False for a hole of a device region that must never be in a view (a vfio
    /// sparse-mmap gap such as an MSI-X table): a segment there is refused.
    pub mappable: bool,
}

impl RegionSpan {
    /// The file offset of host address `addr`, which must lie in the region.
    ///
    /// ```
    /// # use iovmap::plan::{FileId, RegionSpan};
    /// let r = RegionSpan { start: 0x1000, end: 0x5000, offset: 0x10000, file: FileId::default(), page_size: 4096,
    ///                      mappable: true };
    /// assert_eq!(r.offset_of(0x1800), 0x10800);
    /// ```
    #[inline]
    pub fn offset_of(&self, addr: usize) -> u64 {
        self.offset + (addr - self.start) as u64
    }
}

/// What iovmap has learned about cloning a region's mappings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloneState {
    /// Not known: try the clone first (or, on kernels that punch holes, find out first).
    Unknown,
    /// A clone of it worked.
    Clones,
    /// The kernel refused with this errno: go straight to the fd.
    Refused(i32),
}

/// A registered region: its span, the duplicated fd and what was learned about it.
#[derive(Debug)]
pub(crate) struct Region {
    pub span: RegionSpan,
    /// The duplicated fd; `None` for a hole.
    fd: Option<OwnedFd>,
    /// The registration this region was made by: one `register` call, or all the areas
    /// and holes of one `register_vfio_region` call. `unregister` removes a whole group.
    group: u64,
    /// 0: not known; -1: a clone worked; otherwise the errno of the refusal.
    clone: AtomicI32,
}

impl Region {
    pub(crate) fn new(span: RegionSpan, fd: Option<OwnedFd>, group: u64) -> Self {
        debug_assert_eq!(span.mappable, fd.is_some());
        Region { span, fd, group, clone: AtomicI32::new(0) }
    }

    /// The fd; the planner never gives a hole a run, so a hole has none to give.
    pub(crate) fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    pub(crate) fn clone_state(&self) -> CloneState {
        match self.clone.load(Ordering::Relaxed) {
            0 => CloneState::Unknown,
            -1 => CloneState::Clones,
            errno => CloneState::Refused(errno),
        }
    }

    /// Remembers, for later runs and later map calls, whether the kernel clones this
    /// region's mapping (`Ok`) or refuses with an errno.
    pub(crate) fn learn(&self, clone: Result<(), i32>) {
        self.clone.store(clone.map_or_else(|errno| errno.max(1), |()| -1), Ordering::Relaxed);
    }
}

/// Registered regions, sorted by address and never overlapping. `spans` mirrors
/// `regions` so the planner can take a plain slice.
#[derive(Debug, Default)]
pub(crate) struct Regions {
    regions: Vec<Region>,
    spans: Vec<RegionSpan>,
    next_group: u64,
}

impl Regions {
    pub(crate) const fn new() -> Self {
        Regions { regions: Vec::new(), spans: Vec::new(), next_group: 0 }
    }

    /// A fresh registration group id.
    pub(crate) fn new_group(&mut self) -> u64 {
        self.next_group += 1;
        self.next_group
    }

    pub(crate) fn spans(&self) -> &[RegionSpan] {
        &self.spans
    }

    pub(crate) fn get(&self, index: usize) -> &Region {
        &self.regions[index]
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.regions.len()
    }

    /// The registered region overlapping `[start, end)`, if any.
    pub(crate) fn overlapping(&self, start: usize, end: usize) -> Option<&RegionSpan> {
        let i = self.spans.partition_point(|s| s.end <= start);
        self.spans.get(i).filter(|s| s.start < end)
    }

    /// Inserts a region that overlaps none of the others.
    pub(crate) fn insert(&mut self, region: Region) {
        debug_assert!(self.overlapping(region.span.start, region.span.end).is_none());
        let i = self.spans.partition_point(|s| s.start < region.span.start);
        self.spans.insert(i, region.span);
        self.regions.insert(i, region);
    }

    /// Removes the registration whose region starts exactly at `start`: that region and
    /// every other region of its group. Returns how many regions went.
    pub(crate) fn remove(&mut self, start: usize) -> usize {
        let Ok(i) = self.spans.binary_search_by_key(&start, |s| s.start) else { return 0 };
        let group = self.regions[i].group;
        let before = self.regions.len();
        let mut keep = self.regions.iter().map(|r| r.group != group);
        self.spans.retain(|_| keep.next().unwrap_or(true));
        self.regions.retain(|r| r.group != group);
        before - self.regions.len()
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

    fn span(start: usize, end: usize) -> RegionSpan {
        RegionSpan { start, end, offset: 0, file: FileId::default(), page_size: 4096, mappable: true }
    }

    #[test]
    fn windows_cover_regions_and_gaps() {
        let spans = [span(0x1000, 0x3000), span(0x5000, 0x6000)];
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
        let fd = || Some(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        let g = r.new_group();
        r.insert(Region::new(span(0x4000, 0x8000), fd(), g));
        assert!(r.overlapping(0x3000, 0x4001).is_some());
        assert!(r.overlapping(0x7fff, 0x9000).is_some());
        assert!(r.overlapping(0x5000, 0x6000).is_some());
        assert!(r.overlapping(0x3000, 0x9000).is_some());
        assert!(r.overlapping(0x3000, 0x4000).is_none());
        assert!(r.overlapping(0x8000, 0x9000).is_none());
        let g2 = r.new_group();
        r.insert(Region::new(span(0x1000, 0x2000), fd(), g2));
        assert_eq!(r.spans()[0].start, 0x1000);
        assert_eq!(r.remove(0x5000), 0);
        assert_eq!(r.remove(0x4000), 1);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn a_group_is_removed_whole() {
        let mut r = Regions::new();
        let fd = || Some(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        let bar = r.new_group();
        r.insert(Region::new(span(0x10000, 0x12000), fd(), bar));
        r.insert(Region::new(RegionSpan { mappable: false, ..span(0x12000, 0x13000) }, None, bar));
        r.insert(Region::new(span(0x13000, 0x20000), fd(), bar));
        let other = r.new_group();
        r.insert(Region::new(span(0x30000, 0x31000), fd(), other));
        assert_eq!(r.remove(0x10000), 3);
        assert_eq!(r.spans().iter().map(|s| s.start).collect::<Vec<_>>(), [0x30000]);
    }
}
