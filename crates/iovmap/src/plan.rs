//! Planning: from an iovec list to the runs that will be placed. Pure: no syscalls.
//!
//! The planner validates every segment, splits segments where they cross a VMA or a
//! registered region, coalesces pieces that continue each other in their backing, and
//! lays the resulting runs out in the view so that each one lands page-aligned. Where
//! the data it needs comes from the kernel (which VMA covers an address), it asks a
//! [`VmaSource`]; tests and the fuzzer hand it a table instead.
//!
//! ```
//! use iovmap::plan::{plan, Vma};
//!
//! // One shared mapping of 16 pages at 0x10000.
//! let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: libc::PROT_READ | libc::PROT_WRITE,
//!                       shared: true, page_size: 0x1000, ..Default::default() }];
//! let iov = |a: usize, l: usize| libc::iovec { iov_base: a as *mut _, iov_len: l };
//! // Three adjacent pages, then one further on: two runs.
//! let list = [iov(0x10000, 0x1000), iov(0x11000, 0x2000), iov(0x18000, 0x1000)];
//! let p = plan(&list, &mut vmas[..], &[], 0x1000)?;
//! assert_eq!(p.runs.len(), 2);
//! assert_eq!((p.runs[0].src(), p.runs[0].len(), p.runs[0].dst()), (0x10000, 0x3000, 0));
//! assert_eq!((p.runs[1].src(), p.runs[1].len(), p.runs[1].dst()), (0x18000, 0x1000, 0x3000));
//! assert_eq!(p.len, 0x4000);
//! # Ok::<(), iovmap::Error>(())
//! ```

use std::collections::BTreeMap;

use crate::error::{Error, Operation};
use crate::regions::region_window;

// The planner's vocabulary, in one place for the fuzz targets (`unstable-internals`).
#[cfg_attr(not(feature = "unstable-internals"), allow(unused_imports))]
pub use crate::regions::{FileId, RegionSpan};
#[cfg_attr(not(feature = "unstable-internals"), allow(unused_imports))]
pub use crate::strategy::{Clonability, Strategy, strategy};
pub use crate::vma::{Vma, VmaSource};

/// Where a run can be mapped from when the clone is not possible or refused.
///
/// ```
/// use iovmap::plan::{plan, FdSource, FileId, RegionSpan, Vma};
/// let rw = libc::PROT_READ | libc::PROT_WRITE;
/// let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: rw, shared: true, page_size: 0x1000, ..Default::default() }];
/// // The mapping is file 7 from offset 0x100000, registered.
/// let regions = [RegionSpan { start: 0x10000, end: 0x20000, offset: 0x100000,
///                             file: FileId { dev: 1, ino: 7 }, page_size: 0x1000, ..RegionSpan::default() }];
/// let iov = [libc::iovec { iov_base: 0x13000 as *mut _, iov_len: 0x1000 }];
/// let p = plan(&iov, &mut vmas[..], &regions, 0x1000)?;
/// assert_eq!(p.runs[0].fd(), Some(FdSource { region: 0, offset: 0x103000 }));
/// # Ok::<(), iovmap::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdSource {
    /// Index of the registered region (in the span table given to [`plan`]).
    pub region: usize,
    /// File offset of the run's first mapped byte.
    pub offset: u64,
}

/// One mapping operation of a view: a page-aligned stretch of one backing.
///
/// Kept small (48 bytes): a scattered list of a million segments is a million runs, and
/// the memory they take is most of what planning it costs.
///
/// ```
/// use iovmap::plan::{plan, Vma};
/// let rw = libc::PROT_READ | libc::PROT_WRITE;
/// let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: rw, shared: true, page_size: 0x1000, ..Default::default() }];
/// let iov = |a: usize, l: usize| libc::iovec { iov_base: a as *mut _, iov_len: l };
/// // Two pages of the same mapping in a row: one run, cloned from 0x14000.
/// let p = plan(&[iov(0x14000, 0x1000), iov(0x15000, 0x1000)], &mut vmas[..], &[], 0x1000)?;
/// let run = p.runs[0];
/// assert_eq!((run.src(), run.len(), run.dst(), run.clonable()), (0x14000, 0x2000, 0, true));
/// assert_eq!((run.first(), run.fd(), run.page_size()), (0, None, 0x1000));
/// # Ok::<(), iovmap::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    dst: usize,
    len: usize,
    src: usize,
    /// File offset of the first byte, when `region` is set.
    offset: u64,
    /// Index of the registered region that can place the run, or `NO_REGION`.
    region: u32,
    first: u32,
    vma: u32,
    page_shift: u8,
    prot: u8,
    clone: bool,
}

const NO_REGION: u32 = u32::MAX;
const _: () = assert!(std::mem::size_of::<Run>() == 48);

impl Run {
    /// Offset of the run's first byte from the start of the reservation.
    ///
    /// ```
    /// # use iovmap::plan::{plan, Vma};
    /// # let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: 3, shared: true, page_size: 0x1000, ..Default::default() }];
    /// # let iov = |a: usize, l: usize| libc::iovec { iov_base: a as *mut _, iov_len: l };
    /// let p = plan(&[iov(0x14000, 0x1000), iov(0x18000, 0x1000)], &mut vmas[..], &[], 0x1000)?;
    /// assert_eq!((p.runs[0].dst(), p.runs[1].dst()), (0, 0x1000));
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    #[inline]
    pub fn dst(&self) -> usize {
        self.dst
    }

    /// Bytes to map: a multiple of [`Run::page_size`].
    ///
    /// ```
    /// # use iovmap::plan::{plan, Vma};
    /// # let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: 3, shared: true, page_size: 0x1000, ..Default::default() }];
    /// # let iov = |a: usize, l: usize| libc::iovec { iov_base: a as *mut _, iov_len: l };
    /// let p = plan(&[iov(0x14000, 0x10)], &mut vmas[..], &[], 0x1000)?;
    /// assert_eq!(p.runs[0].len(), 0x1000); // the whole last page
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    #[inline]
    #[allow(clippy::len_without_is_empty)] // a run is never empty
    pub fn len(&self) -> usize {
        self.len
    }

    /// Host address of the run's first mapped byte (page-aligned): the clone source.
    ///
    /// ```
    /// # use iovmap::plan::{plan, Vma};
    /// # let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: 3, shared: true, page_size: 0x1000, ..Default::default() }];
    /// # let iov = |a: usize, l: usize| libc::iovec { iov_base: a as *mut _, iov_len: l };
    /// let p = plan(&[iov(0x14080, 0x10)], &mut vmas[..], &[], 0x1000)?;
    /// assert_eq!(p.runs[0].src(), 0x14000);
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    #[inline]
    pub fn src(&self) -> usize {
        self.src
    }

    /// Whether `[src, src + len)` lies in one VMA, so that one clone can place it.
    ///
    /// ```
    /// # use iovmap::plan::{plan, Vma};
    /// # let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: 3, shared: true, page_size: 0x1000, ..Default::default() }];
    /// # let iov = |a: usize, l: usize| libc::iovec { iov_base: a as *mut _, iov_len: l };
    /// assert!(plan(&[iov(0x14000, 0x1000)], &mut vmas[..], &[], 0x1000)?.runs[0].clonable());
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    #[inline]
    pub fn clonable(&self) -> bool {
        self.clone
    }

    /// The registered fd that can place the run, when every piece of it is registered and
    /// the pieces are contiguous in one file.
    ///
    /// ```
    /// # use iovmap::plan::{plan, Vma};
    /// # let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: 3, shared: true, page_size: 0x1000, ..Default::default() }];
    /// # let iov = |a: usize, l: usize| libc::iovec { iov_base: a as *mut _, iov_len: l };
    /// assert_eq!(plan(&[iov(0x14000, 0x1000)], &mut vmas[..], &[], 0x1000)?.runs[0].fd(), None);
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    #[inline]
    pub fn fd(&self) -> Option<FdSource> {
        (self.region != NO_REGION).then_some(FdSource { region: self.region as usize, offset: self.offset })
    }

    /// Page size of the backing; `dst`, `src` and `len` are multiples of it.
    ///
    /// ```
    /// # use iovmap::plan::{plan, Vma};
    /// # let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: 3, shared: true, page_size: 0x1000, ..Default::default() }];
    /// # let iov = |a: usize, l: usize| libc::iovec { iov_base: a as *mut _, iov_len: l };
    /// assert_eq!(plan(&[iov(0x14000, 0x1000)], &mut vmas[..], &[], 0x1000)?.runs[0].page_size(), 0x1000);
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    #[inline]
    pub fn page_size(&self) -> usize {
        1 << self.page_shift
    }

    /// Protection of the source (`PROT_*`): what a clone inherits; for a run placed by fd
    /// across several VMAs, what all of them allow.
    ///
    /// ```
    /// # use iovmap::plan::{plan, Vma};
    /// # let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: libc::PROT_READ, shared: true, page_size: 0x1000, ..Default::default() }];
    /// # let iov = |a: usize, l: usize| libc::iovec { iov_base: a as *mut _, iov_len: l };
    /// assert_eq!(plan(&[iov(0x14000, 0x1000)], &mut vmas[..], &[], 0x1000)?.runs[0].prot(), libc::PROT_READ);
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    #[inline]
    pub fn prot(&self) -> i32 {
        i32::from(self.prot)
    }

    /// Index (in the caller's list) of the first segment that contributes to the run.
    ///
    /// ```
    /// # use iovmap::plan::{plan, Vma};
    /// # let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: 3, shared: true, page_size: 0x1000, ..Default::default() }];
    /// # let iov = |a: usize, l: usize| libc::iovec { iov_base: a as *mut _, iov_len: l };
    /// let p = plan(&[iov(0x14000, 0), iov(0x14000, 0x1000)], &mut vmas[..], &[], 0x1000)?;
    /// assert_eq!(p.runs[0].first(), 1);
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    #[inline]
    pub fn first(&self) -> usize {
        self.first as usize
    }

    /// Which source VMA the run's first piece lies in, as an index shared by every run of
    /// the same plan from the same VMA.
    ///
    /// ```
    /// # use iovmap::plan::{plan, Vma};
    /// # let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: 3, shared: true, page_size: 0x1000, ..Default::default() },
    /// #                 Vma { start: 0x30000, end: 0x40000, prot: 3, shared: true, page_size: 0x1000, ..Default::default() }];
    /// # let iov = |a: usize, l: usize| libc::iovec { iov_base: a as *mut _, iov_len: l };
    /// let p = plan(&[iov(0x14000, 0x1000), iov(0x30000, 0x1000), iov(0x18000, 0x1000)], &mut vmas[..], &[], 0x1000)?;
    /// assert_eq!(p.runs[0].vma(), p.runs[2].vma());
    /// assert_ne!(p.runs[0].vma(), p.runs[1].vma());
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    #[inline]
    pub fn vma(&self) -> usize {
        self.vma as usize
    }
}

/// Everything needed to build a view, decided before anything is mapped.
///
/// ```
/// use iovmap::plan::{plan, Vma};
/// let rw = libc::PROT_READ | libc::PROT_WRITE;
/// let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: rw, shared: true, page_size: 0x1000, ..Default::default() }];
/// let iov = |a: usize, l: usize| libc::iovec { iov_base: a as *mut _, iov_len: l };
/// // Starts 0x80 bytes into a page, ends mid-page: one page mapped, 0x100 bytes viewed.
/// let p = plan(&[iov(0x12080, 0x100)], &mut vmas[..], &[], 0x1000)?;
/// assert_eq!((p.lead, p.len, p.map_len, p.align, p.segments, p.prot), (0x80, 0x100, 0x1000, 0x1000, 1, rw));
/// # Ok::<(), iovmap::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The runs, in view order.
    pub runs: Vec<Run>,
    /// Number of non-empty segments.
    pub segments: usize,
    /// Exact byte length of the view (the sum of the segment lengths).
    pub len: usize,
    /// Offset of the view's first byte in the first run (the first segment may start
    /// mid-page).
    pub lead: usize,
    /// Bytes to reserve: the end of the last run.
    pub map_len: usize,
    /// Alignment the reservation needs: the largest page size of any run.
    pub align: usize,
    /// The VMAs the runs come from, as the planner saw them, indexed by [`Run::vma`]. The
    /// map path checks, after cloning, that they are still there as seen.
    pub vmas: Vec<Vma>,
    /// What every run's source allows (the AND of their [`Run::prot`]): a view asking
    /// for no more needs no check run by run.
    pub prot: i32,
}

/// The run being built.
struct Open {
    run: Run,
    /// Index of the last segment added so far.
    last: usize,
    /// Host address one past the last byte added so far.
    src_end: usize,
    /// The VMA of the last piece, which a clone continuation must share: the whole VMA,
    /// not its start (under a race, two lookups may find two mappings with one start).
    vma: Vma,
    /// File offset one past the last byte added, when the run can be placed by fd.
    off_end: u64,
    /// End of the VMA and region (or gap) of the last piece: the run may not map past it.
    limit: usize,
    /// Bytes the run maps so far, from `run.src`. Not `src_end - run.src`: a run
    /// coalesced by file offset may hop between address ranges.
    mapped: usize,
}

struct Planner<'a, V: ?Sized> {
    vmas: &'a mut V,
    spans: &'a [RegionSpan],
    base_page: usize,
    /// Runs of regions udmabuf takes are laid out at the base page, whatever their
    /// mapping's page size (see [`plan_for_kernel_built`]).
    kernel_built_pages: bool,
    runs: Vec<Run>,
    open: Option<Open>,
    /// The VMAs the source told, by index (what [`Run::vma`] names): the one cache of a
    /// plan, so that each VMA is asked for once.
    vmas_seen: Vec<Vma>,
    /// Index in `vmas_seen` of the VMA starting at each address, for lookups by address.
    by_start: BTreeMap<usize, u32>,
    /// The index of the VMA of the last piece: most pieces are in the same one.
    last_vma: Option<u32>,
    lead: usize,
    align: usize,
}

/// Plans a view of `iovs`: validates, splits, coalesces and lays out the runs.
///
/// `vmas` answers which mapping covers an address; `regions` is the registered table,
/// sorted by address and non-overlapping; `base_page` is the system page size.
///
/// ```
/// use iovmap::plan::{plan, Vma};
/// let rw = libc::PROT_READ | libc::PROT_WRITE;
/// let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: rw, shared: true, page_size: 0x1000, ..Default::default() }];
/// let iov = |a: usize, l: usize| libc::iovec { iov_base: a as *mut _, iov_len: l };
/// let e = plan(&[iov(0x30000, 0x1000)], &mut vmas[..], &[], 0x1000).unwrap_err();
/// assert!(matches!(e, iovmap::Error::NotMapped { index: 0 }));
/// ```
///
/// # Errors
/// [`Error::Empty`], [`Error::TooLarge`], [`Error::NotMapped`], [`Error::NotShareable`],
/// [`Error::Unaligned`], and [`Error::Os`] when the VMA source fails.
pub fn plan<V: VmaSource + ?Sized>(
    iovs: &[libc::iovec],
    vmas: &mut V,
    regions: &[RegionSpan],
    base_page: usize,
) -> Result<Plan, Error> {
    let mut out = Plan::default();
    plan_into(iovs, vmas, regions, base_page, &mut out)?;
    Ok(out)
}

/// [`plan`], into `out`, reusing the memory of its run list: for callers that plan
/// repeatedly. A scattered list of a million segments is a million runs (48 MB); planning
/// into fresh memory makes the kernel fault in and zero all of it, which costs more than
/// the planning itself.
///
/// ```
/// use iovmap::plan::{plan_into, Plan, Vma};
/// let mut vmas = [Vma { start: 0x10000, end: 0x20000, prot: 3, shared: true, page_size: 0x1000, ..Default::default() }];
/// let iov = |a: usize| libc::iovec { iov_base: a as *mut _, iov_len: 0x1000 };
/// let mut reused = Plan::default();
/// for list in [[iov(0x10000), iov(0x12000)], [iov(0x13000), iov(0x14000)]] {
///     plan_into(&list, &mut vmas[..], &[], 0x1000, &mut reused)?;
/// }
/// assert_eq!(reused.runs.len(), 1); // the second list: two adjacent pages
/// # Ok::<(), iovmap::Error>(())
/// ```
///
/// # Errors
/// As [`plan`]; `out` is then left empty.
pub fn plan_into<V: VmaSource + ?Sized>(
    iovs: &[libc::iovec],
    vmas: &mut V,
    regions: &[RegionSpan],
    base_page: usize,
    out: &mut Plan,
) -> Result<(), Error> {
    plan_inner(iovs, vmas, regions, base_page, false, out)
}

/// [`plan`] for a view the kernel builds (udmabuf): runs in regions udmabuf takes
/// (`RegionSpan::kernel_built`) are laid out at the base page even where their mapping's
/// pages are huge, so that 4 KiB pieces of huge-page RAM, which no clone or fd mapping
/// can place, become runs only udmabuf can place.
///
/// ```
/// use iovmap::plan::{plan, plan_for_kernel_built, FileId, RegionSpan, Vma};
/// let (h, p) = (0x20_0000, 0x1000);
/// let file = FileId { dev: 1, ino: 1 };
/// let mut vmas = [Vma { start: 0x4000_0000, end: 0x4000_0000 + 4 * h, prot: 3, shared: true, page_size: h, file, offset: 0 }];
/// let ram = [RegionSpan { start: 0x4000_0000, end: 0x4000_0000 + 4 * h, page_size: h, file, mapped_file: file,
///                         kernel_built: true, ..RegionSpan::default() }];
/// let iov = |a: usize| libc::iovec { iov_base: (0x4000_0000 + a) as *mut _, iov_len: p };
/// let list = [iov(3 * h + 5 * p), iov(h + 9 * p)]; // two 4 KiB pages of two huge pages
/// assert!(matches!(plan(&list, &mut vmas[..], &ram, p), Err(iovmap::Error::Unaligned { index: 0, .. })));
/// let kb = plan_for_kernel_built(&list, &mut vmas[..], &ram, p)?;
/// assert_eq!((kb.runs.len(), kb.runs[1].page_size(), kb.align), (2, p, p));
/// # Ok::<(), iovmap::Error>(())
/// ```
///
/// # Errors
/// As [`plan`].
pub fn plan_for_kernel_built<V: VmaSource + ?Sized>(
    iovs: &[libc::iovec],
    vmas: &mut V,
    regions: &[RegionSpan],
    base_page: usize,
) -> Result<Plan, Error> {
    let mut out = Plan::default();
    plan_inner(iovs, vmas, regions, base_page, true, &mut out)?;
    Ok(out)
}

fn plan_inner<V: VmaSource + ?Sized>(
    iovs: &[libc::iovec],
    vmas: &mut V,
    regions: &[RegionSpan],
    base_page: usize,
    kernel_built_pages: bool,
    out: &mut Plan,
) -> Result<(), Error> {
    let mut runs = std::mem::take(&mut out.runs);
    runs.clear();
    *out = Plan::default();
    let mut p = Planner {
        vmas,
        spans: regions,
        base_page,
        kernel_built_pages,
        runs,
        open: None,
        vmas_seen: Vec::new(),
        by_start: BTreeMap::new(),
        last_vma: None,
        lead: 0,
        align: base_page,
    };
    if u32::try_from(iovs.len()).is_err() {
        return Err(Error::TooLarge);
    }
    // The fast path: a segment that continues the open run inside the same VMA and the
    // same region (or gap) only extends it, and so may the ones after it (`extend`).
    // Any other takes the slow path.
    let mut fast = Fast { cursor: 0, window: 0, total: 0, segments: 0, last: 0 };
    let mut index = 0;
    while let Some(iov) = iovs.get(index) {
        let (addr, len) = (iov.iov_base as usize, iov.iov_len);
        if len == 0 || (addr == fast.cursor && len <= fast.window - addr) {
            index = extend(iovs, index, &mut fast)?;
            continue;
        }
        fast.segments += 1;
        fast.total = add_len(fast.total, len)?;
        // Sync the open run with what the fast path added, then take the slow path.
        p.sync(fast.cursor, fast.last);
        let end = addr.checked_add(len).ok_or(Error::NotMapped { index })?;
        let mut at = addr;
        let mut window = fast.window;
        while at < end {
            (at, window) = p.piece(at, end, index)?;
        }
        fast = Fast { cursor: end, window, last: index, ..fast };
        index += 1;
    }
    let Fast { cursor, last, total, segments, .. } = fast;
    p.sync(cursor, last);
    if total == 0 {
        return Err(Error::Empty);
    }
    p.close_last()?;
    let map_len = p.runs.last().map_or(0, |r| r.dst + r.len);
    if map_len > isize::MAX as usize - p.align {
        return Err(Error::TooLarge);
    }
    let prot = p.runs.iter().fold(!0, |all, r| all & r.prot());
    *out = Plan { runs: p.runs, segments, len: total, lead: p.lead, map_len, align: p.align, vmas: p.vmas_seen, prot };
    Ok(())
}

/// What the fast path of planning carries from segment to segment.
#[derive(Clone, Copy)]
struct Fast {
    /// Where the open run ends.
    cursor: usize,
    /// The end of the stretch the open run may grow into; `window >= cursor` always.
    window: usize,
    /// Bytes of the list so far.
    total: usize,
    /// Non-empty segments so far.
    segments: usize,
    /// The index of the last segment added.
    last: usize,
}

/// Adds a segment's length to the bytes so far. Checked per segment: the view offset of
/// any byte (the lead plus the bytes before it) then stays below usize::MAX, so no run's
/// place can wrap.
#[inline]
fn add_len(total: usize, len: usize) -> Result<usize, Error> {
    total.checked_add(len).filter(|&t| t <= isize::MAX as usize).ok_or(Error::TooLarge)
}

/// The fast path: from segment `from`, skips empty segments and adds those that continue
/// the open run inside its window; returns the index of the first segment that does
/// neither, or `iovs.len()`.
///
/// Its loop does per segment only what it must: skip an empty one, or check that the
/// segment starts where the run ends and fits in what is left of the window, and move the
/// run's end. The bookkeeping (the bytes, the segments, the last one added) is derived
/// once the stretch ends: the bytes are how far the end moved. A function of its own, so
/// that its few values live in registers: as a branch of the planner's loop they were
/// spilled to the stack around the slow path's calls, and W1 (262,144 adjacent iovecs)
/// mapped 1.12-1.25x slower than 0.1 did; with the bookkeeping in the loop it still took
/// 25 instructions a segment, 11 now.
#[inline(never)]
fn extend(iovs: &[libc::iovec], from: usize, f: &mut Fast) -> Result<usize, Error> {
    let start = f.cursor;
    let mut cursor = start;
    let mut room = f.window - start;
    let mut empty = 0;
    let mut i = from;
    // Four at a time while four in a row continue the run, none of them empty (the list
    // of a large contiguous buffer): one loop branch for four segments. Each is checked as
    // below, `room` spent segment by segment (no sum can wrap); the first four that do
    // not all continue are left to the loop below, one by one.
    while let Some(q) = iovs.get(i..i + 4) {
        let (mut end, mut left, mut n) = (cursor, room, 0);
        for iov in q {
            let len = iov.iov_len;
            // One compare for "empty, or longer than what is left": an empty segment
            // wraps to usize::MAX.
            if iov.iov_base as usize != end || len.wrapping_sub(1) >= left {
                break;
            }
            left -= len;
            end += len;
            n += 1;
        }
        if n < 4 {
            break;
        }
        (cursor, room) = (end, left);
        i += 4;
    }
    while let Some(iov) = iovs.get(i) {
        let len = iov.iov_len;
        if len == 0 {
            empty += 1;
        } else if iov.iov_base as usize != cursor || len > room {
            break;
        } else {
            room -= len;
            cursor += len;
        }
        i += 1;
    }
    let added = i - from - empty;
    if added > 0 {
        // The bytes of the list so far stay below isize::MAX, so that no run's place in
        // the view can wrap (`add_len`).
        f.total = add_len(f.total, cursor - start)?;
        f.segments += added;
        f.last = (from..i).rev().find(|&k| iovs[k].iov_len != 0).expect("a segment was added");
        f.cursor = cursor;
    }
    Ok(i)
}

#[inline]
fn is_aligned(x: usize, to: usize) -> bool {
    x & (to - 1) == 0
}

impl<V: VmaSource + ?Sized> Planner<'_, V> {
    /// Records bytes (and segments) the fast path appended to the open run.
    fn sync(&mut self, cursor: usize, last: usize) {
        if let Some(open) = self.open.as_mut() {
            open.last = open.last.max(last);
            if cursor > open.src_end {
                let grown = cursor - open.src_end;
                open.src_end = cursor;
                open.off_end += grown as u64;
                open.mapped += grown;
            }
        }
    }

    fn vma_at(&mut self, at: usize, index: usize) -> Result<(Vma, u32), Error> {
        let known = self.last_vma.filter(|&i| self.vmas_seen[i as usize].contains(at)).or_else(|| {
            let (_, &i) = self.by_start.range(..=at).next_back()?;
            self.vmas_seen[i as usize].contains(at).then_some(i)
        });
        if let Some(i) = known {
            self.last_vma = Some(i);
            return Ok((self.vmas_seen[i as usize], i));
        }
        let found =
            self.vmas.vma_at(at).map_err(|source| Error::Os { op: Operation::VmaQuery, index: Some(index), source })?;
        // A source that answers with a VMA not covering `at` is treated as "not mapped",
        // so that the planner always makes progress.
        let v = found.filter(|v| v.contains(at)).ok_or(Error::NotMapped { index })?;
        // Under a race, two lookups may find two mappings with one start: the index names
        // the whole VMA (extent, file, offset), not its start.
        let i = match self.by_start.get(&v.start) {
            Some(&i) if self.vmas_seen[i as usize] == v => i,
            _ => {
                let i = self.vmas_seen.len() as u32;
                self.vmas_seen.push(v);
                self.by_start.insert(v.start, i);
                i
            }
        };
        self.last_vma = Some(i);
        Ok((v, i))
    }

    /// Adds the piece of segment `index` that starts at `at` (and ends at `end` or at the
    /// first VMA or region boundary). Returns where the piece ends and the end of the
    /// window the open run may keep growing into.
    fn piece(&mut self, at: usize, end: usize, index: usize) -> Result<(usize, usize), Error> {
        let (region, region_start, region_end) = region_window(self.spans, at);
        if region.is_some_and(|r| !self.spans[r].mappable) {
            return Err(Error::DeviceHole { index });
        }
        let (vma, vma_index) = self.vma_at(at, index)?;
        if !vma.shared {
            return Err(Error::NotShareable { index });
        }
        let window = vma.end.min(region_end);
        let piece_end = end.min(window);
        let span = region.map(|r| self.spans[r]);
        if let Some(s) = span.filter(|s| !s.still_maps(&vma, at)) {
            return Err(Error::StaleRegion { index, at, region: s.id });
        }
        let page_size = match span {
            Some(s) if self.kernel_built_pages && s.kernel_built => self.base_page,
            _ => vma.page_size.max(span.map_or(0, |s| s.page_size)).max(self.base_page),
        };
        let offset = span.map(|s| s.offset_of(at));

        if let Some(open) = self.open.as_mut() {
            // A run has one page size: a piece of another never continues it.
            let same_page = page_size == open.run.page_size();
            let by_clone = same_page && open.run.clone && at == open.src_end && vma == open.vma;
            let by_fd = same_page
                && match (open.run.fd(), span, offset) {
                    (Some(fd), Some(s), Some(off)) => self.spans[fd.region].file == s.file && off == open.off_end,
                    _ => false,
                };
            if by_clone || by_fd {
                open.run.clone = by_clone;
                open.run.prot &= (vma.prot & 0xff) as u8;
                if !by_fd {
                    open.run.region = NO_REGION;
                }
                open.last = index;
                open.off_end = offset.map_or(0, |o| o + (piece_end - at) as u64);
                open.mapped += piece_end - at;
                open.src_end = piece_end;
                open.vma = vma;
                open.limit = window;
                return Ok((piece_end, window));
            }
        }

        // A new run starts here. Interior boundaries must be aligned on both sides; the
        // first run is mapped from the page boundary below its first byte.
        let (dst, src) = match self.close_interior()? {
            Some(prev) => {
                let dst = prev.dst.checked_add(prev.len).ok_or(Error::TooLarge)?;
                if !is_aligned(at, page_size) || !is_aligned(dst, page_size) {
                    return Err(Error::Unaligned { index, page_size });
                }
                (dst, at)
            }
            None => {
                self.lead = at & (page_size - 1);
                (0, at - self.lead)
            }
        };
        // Holds for every real VMA and registered region (their bounds are aligned to
        // their page size); a table that breaks it cannot be placed without crossing.
        let floor = (at - src) as u64;
        let fd_offset = offset.map(|o| o.checked_sub(floor));
        if src < vma.start || src < region_start || fd_offset == Some(None) {
            return Err(Error::Unaligned { index, page_size });
        }
        self.align = self.align.max(page_size);
        let fd = region.zip(fd_offset.flatten());
        self.open = Some(Open {
            run: Run {
                dst,
                len: 0,
                src,
                offset: fd.map_or(0, |f| f.1),
                region: fd.map_or(NO_REGION, |f| f.0 as u32),
                first: index as u32,
                vma: vma_index,
                page_shift: page_size.trailing_zeros() as u8,
                prot: (vma.prot & 0xff) as u8,
                clone: true,
            },
            last: index,
            src_end: piece_end,
            vma,
            off_end: offset.map_or(0, |o| o + (piece_end - at) as u64),
            limit: window,
            mapped: piece_end - src,
        });
        Ok((piece_end, window))
    }

    /// Closes the open run because another starts after it: its end must be aligned.
    fn close_interior(&mut self) -> Result<Option<Run>, Error> {
        let Some(open) = self.open.take() else { return Ok(None) };
        let mut run = open.run;
        // Its end, in the source and in the view (a run that hops between aliases of one
        // file by offset maps `mapped` bytes, whatever the addresses), is on a page boundary.
        if !is_aligned(open.src_end, run.page_size()) || !is_aligned(open.mapped, run.page_size()) {
            return Err(Error::Unaligned { index: open.last, page_size: run.page_size() });
        }
        run.len = open.mapped;
        self.runs.push(run);
        Ok(Some(run))
    }

    /// Closes the last run: it may end mid-page, and maps the whole last page.
    fn close_last(&mut self) -> Result<(), Error> {
        let Some(open) = self.open.take() else { return Ok(()) };
        let mut run = open.run;
        // Mapped to the end of its last page: the tail goes on from the last piece, which
        // must hold it (its VMA and region, or gap, end on page boundaries).
        let len = open.mapped.checked_next_multiple_of(run.page_size()).ok_or(Error::TooLarge)?;
        let end = open.src_end.checked_add(len - open.mapped).ok_or(Error::TooLarge)?;
        if end > open.limit {
            return Err(Error::Unaligned { index: open.last, page_size: run.page_size() });
        }
        run.len = len;
        run.dst.checked_add(run.len).ok_or(Error::TooLarge)?;
        self.runs.push(run);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: usize = 0x1000;
    const H: usize = 0x20_0000;
    const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

    fn iov(a: usize, l: usize) -> libc::iovec {
        libc::iovec { iov_base: a as *mut libc::c_void, iov_len: l }
    }
    fn shared(start: usize, end: usize) -> Vma {
        Vma { start, end, prot: RW, shared: true, page_size: P, ..Default::default() }
    }
    /// A shared mapping of file `ino` from `offset`.
    fn file_vma(start: usize, end: usize, offset: u64, ino: u64) -> Vma {
        Vma { offset, file: FileId { dev: 1, ino }, ..shared(start, end) }
    }
    /// A region of file `ino` from `offset`, as registered over `file_vma`s of it.
    fn span(start: usize, end: usize, offset: u64, ino: u64) -> RegionSpan {
        let file = FileId { dev: 1, ino };
        RegionSpan {
            start,
            end,
            offset,
            file,
            page_size: P,
            mapped_file: file,
            mapped_offset: offset,
            ..Default::default()
        }
    }
    fn run_plan(list: &[libc::iovec], vmas: &[Vma], regions: &[RegionSpan]) -> Result<Plan, Error> {
        let mut v = vmas.to_vec();
        plan(list, &mut v[..], regions, P)
    }

    #[test]
    fn adjacent_pages_of_one_mapping_are_one_run() {
        let n = 262_144;
        let base = 0x1000_0000;
        let list: Vec<_> = (0..n).map(|i| iov(base + i * P, P)).collect();
        let p = run_plan(&list, &[shared(base, base + n * P)], &[]).unwrap();
        assert_eq!(p.runs.len(), 1);
        assert_eq!(p.segments, n);
        assert_eq!(p.len, n * P);
        let r = p.runs[0];
        assert_eq!((r.dst(), r.len(), r.src(), r.clonable(), r.fd(), r.page_size()), (0, n * P, base, true, None, P));
        assert_eq!((r.prot(), r.first(), r.vma()), (RW, 0, 0));
    }

    #[test]
    fn zero_length_segments_are_skipped_and_all_zero_is_empty() {
        let list = [iov(0x1000, 0), iov(0x1000, P), iov(0, 0), iov(0x2000, P)];
        let p = run_plan(&list, &[shared(0x1000, 0x3000)], &[]).unwrap();
        assert_eq!((p.segments, p.runs.len(), p.runs[0].first()), (2, 1, 1));
        assert!(matches!(run_plan(&[iov(0x1000, 0)], &[], &[]), Err(Error::Empty)));
        assert!(matches!(run_plan(&[], &[], &[]), Err(Error::Empty)));
    }

    #[test]
    fn a_segment_across_two_mappings_is_split_at_the_boundary() {
        let vmas = [shared(0x10000, 0x12000), shared(0x12000, 0x14000)];
        let p = run_plan(&[iov(0x11000, 0x2000)], &vmas, &[]).unwrap();
        assert_eq!(p.runs.len(), 2);
        assert_eq!((p.runs[0].src(), p.runs[0].len(), p.runs[0].dst()), (0x11000, 0x1000, 0));
        assert_eq!((p.runs[1].src(), p.runs[1].len(), p.runs[1].dst()), (0x12000, 0x1000, 0x1000));
        assert!(p.runs.iter().all(|r| r.clonable() && r.first() == 0));
        assert_ne!(p.runs[0].vma(), p.runs[1].vma());
    }

    #[test]
    fn first_may_start_and_last_may_end_mid_page() {
        let list = [iov(0x10100, 0xf00), iov(0x14000, 0x10)];
        let p = run_plan(&list, &[shared(0x10000, 0x20000)], &[]).unwrap();
        assert_eq!(p.lead, 0x100);
        assert_eq!(p.len, 0xf10);
        assert_eq!((p.runs[0].src(), p.runs[0].len()), (0x10000, 0x1000));
        assert_eq!((p.runs[1].src(), p.runs[1].len(), p.runs[1].dst()), (0x14000, 0x1000, 0x1000));
        assert_eq!(p.map_len, 0x2000);
    }

    #[test]
    fn unaligned_interior_boundaries_name_the_segment() {
        let vmas = [shared(0x10000, 0x20000)];
        // Ends mid-page, and the next one is not its continuation.
        let e = run_plan(&[iov(0x10000, 0x800), iov(0x13000, P)], &vmas, &[]).unwrap_err();
        assert!(matches!(e, Error::Unaligned { index: 0, .. }), "{e:?}");
        // Starts mid-page after an aligned end.
        let e = run_plan(&[iov(0x10000, P), iov(0x13800, 0x800)], &vmas, &[]).unwrap_err();
        assert!(matches!(e, Error::Unaligned { index: 1, .. }), "{e:?}");
        // A mid-page continuation is no boundary at all.
        let p = run_plan(&[iov(0x10000, 0x800), iov(0x10800, 0x900)], &vmas, &[]).unwrap();
        assert_eq!(p.runs.len(), 1);
        assert_eq!(p.runs[0].len(), 0x2000);
    }

    #[test]
    fn private_and_unmapped_memory_are_refused_with_the_index() {
        let vmas = [shared(0x10000, 0x20000), Vma { shared: false, ..shared(0x20000, 0x30000) }];
        let e = run_plan(&[iov(0x10000, P), iov(0x1f000, 2 * P)], &vmas, &[]).unwrap_err();
        assert!(matches!(e, Error::NotShareable { index: 1 }), "{e:?}");
        let e = run_plan(&[iov(0x10000, P), iov(0x40000, P)], &vmas, &[]).unwrap_err();
        assert!(matches!(e, Error::NotMapped { index: 1 }), "{e:?}");
        let e = run_plan(&[iov(usize::MAX - 10, 20)], &vmas, &[]).unwrap_err();
        assert!(matches!(e, Error::NotMapped { index: 0 }), "{e:?}");
    }

    #[test]
    fn overflowing_sums_are_too_large() {
        // A segment longer than isize::MAX is too large before it is found to wrap.
        let e = run_plan(&[iov(0x10000, usize::MAX)], &[shared(0x10000, 0x20000)], &[]).unwrap_err();
        assert!(matches!(e, Error::TooLarge), "{e:?}");
        // A segment of sane length that wraps the address space cannot be mapped.
        let e = run_plan(&[iov(usize::MAX - 10, 20)], &[shared(0x10000, 0x20000)], &[]).unwrap_err();
        assert!(matches!(e, Error::NotMapped { index: 0 }), "{e:?}");
        // Valid segments whose sum overflows (a huge mapping listed repeatedly).
        let huge = shared(P, usize::MAX - P + 1);
        let big = isize::MAX as usize & !(P - 1);
        let e = run_plan(&[iov(P, big), iov(P, big), iov(P, big)], &[huge], &[]).unwrap_err();
        assert!(matches!(e, Error::TooLarge), "{e:?}");
        // A sum that fits in usize but not in isize.
        let e = run_plan(&[iov(P, big), iov(P, big)], &[huge], &[]).unwrap_err();
        assert!(matches!(e, Error::TooLarge), "{e:?}");
    }

    #[test]
    fn registered_runs_carry_their_fd_offset_and_cross_vmas_by_fd() {
        // One region over two VMAs (say the VMM mprotected half of it): one fd run.
        let vmas = [file_vma(0x10000, 0x14000, 0x100000, 7), file_vma(0x14000, 0x18000, 0x104000, 7)];
        let regions = [span(0x10000, 0x18000, 0x100000, 7)];
        let p = run_plan(&[iov(0x12000, 0x4000)], &vmas, &regions).unwrap();
        assert_eq!(p.runs.len(), 1);
        let r = p.runs[0];
        assert!(!r.clonable());
        assert_eq!(r.fd(), Some(FdSource { region: 0, offset: 0x102000 }));
        assert_eq!(r.len(), 0x4000);
    }

    #[test]
    fn registered_pieces_of_one_file_coalesce_by_offset() {
        // The same file mapped twice; the list jumps from one alias to the other at
        // contiguous file offsets: one fd run, not clonable.
        let vmas = [file_vma(0x10000, 0x14000, 0, 3), file_vma(0x40000, 0x44000, 0x4000, 3)];
        let regions = [span(0x10000, 0x14000, 0, 3), span(0x40000, 0x44000, 0x4000, 3)];
        let p = run_plan(&[iov(0x13000, P), iov(0x40000, P)], &vmas, &regions).unwrap();
        assert_eq!(p.runs.len(), 1);
        assert!(!p.runs[0].clonable());
        assert_eq!(p.runs[0].fd(), Some(FdSource { region: 0, offset: 0x3000 }));
        assert_eq!((p.runs[0].len(), p.map_len, p.len), (2 * P, 2 * P, 2 * P));
        // Different files never coalesce.
        let vmas = [file_vma(0x10000, 0x14000, 0, 3), file_vma(0x40000, 0x44000, 0x4000, 4)];
        let regions = [span(0x10000, 0x14000, 0, 3), span(0x40000, 0x44000, 0x4000, 4)];
        assert_eq!(run_plan(&[iov(0x13000, P), iov(0x40000, P)], &vmas, &regions).unwrap().runs.len(), 2);
    }

    #[test]
    fn a_registered_and_an_unregistered_part_of_one_vma_clone_together() {
        let vmas = [file_vma(0x10000, 0x20000, 0, 3)];
        let regions = [span(0x10000, 0x12000, 0, 3)];
        let p = run_plan(&[iov(0x11000, 2 * P)], &vmas, &regions).unwrap();
        assert_eq!(p.runs.len(), 1);
        assert!(p.runs[0].clonable());
        assert_eq!(p.runs[0].fd(), None);
    }

    #[test]
    fn huge_pages_align_runs_and_the_reservation() {
        let huge = Vma { page_size: H, ..file_vma(0x4000_0000, 0x4080_0000, 0, 9) };
        let small = shared(0x10000, 0x300000);
        let regions = [RegionSpan { page_size: H, ..span(0x4000_0000, 0x4080_0000, 0, 9) }];
        // A 2 MiB-long 4 KiB run first keeps the huge run aligned in the view.
        let p = run_plan(&[iov(0x10000, H), iov(0x4020_0000, H)], &[small, huge], &regions).unwrap();
        assert_eq!(p.align, H);
        assert_eq!(p.runs[1].dst(), H);
        assert_eq!(p.runs[1].page_size(), H);
        // One 4 KiB page before it does not.
        let e = run_plan(&[iov(0x10000, P), iov(0x4020_0000, H)], &[small, huge], &regions).unwrap_err();
        assert!(matches!(e, Error::Unaligned { index: 1, .. }), "{e:?}");
        // A huge run may start mid-page: it is mapped from its huge page boundary.
        let p = run_plan(&[iov(0x4020_1000, 0x10)], &[huge], &regions).unwrap();
        assert_eq!((p.lead, p.runs[0].src(), p.runs[0].len()), (0x1000, 0x4020_0000, H));
        assert_eq!(p.runs[0].fd(), Some(FdSource { region: 0, offset: 0x20_0000 }));
    }

    #[test]
    fn a_segment_in_a_device_hole_is_refused_even_where_unmapped() {
        let vmas = [file_vma(0x10000, 0x12000, 0, 5), file_vma(0x13000, 0x20000, 0x3000, 5)];
        let regions = [
            span(0x10000, 0x12000, 0, 5),
            RegionSpan { mappable: false, ..span(0x12000, 0x13000, 0x2000, 5) },
            span(0x13000, 0x20000, 0x3000, 5),
        ];
        let p = run_plan(&[iov(0x11000, P), iov(0x13000, P)], &vmas, &regions).unwrap();
        assert_eq!(p.runs.len(), 2);
        // The second segment continues the first, then runs on into the hole.
        let e = run_plan(&[iov(0x10000, P), iov(0x11000, 0x1800)], &vmas, &regions).unwrap_err();
        assert!(matches!(e, Error::DeviceHole { index: 1 }), "{e:?}");
        let e = run_plan(&[iov(0x12800, 0x100)], &vmas, &regions).unwrap_err();
        assert!(matches!(e, Error::DeviceHole { index: 0 }), "{e:?}");
    }

    #[test]
    fn a_registered_region_that_no_longer_maps_its_file_is_stale() {
        let regions = [span(0x10000, 0x20000, 0x200000, 7)];
        let list = [iov(0x10000, P), iov(0x15000, P)];
        assert!(run_plan(&list, &[file_vma(0x10000, 0x20000, 0x200000, 7)], &regions).is_ok());
        // Another file mapped there, the same file at another offset, anonymous memory:
        // each names the segment and the registration.
        let replaced =
            [file_vma(0x10000, 0x20000, 0x200000, 8), file_vma(0x10000, 0x20000, 0, 7), shared(0x10000, 0x20000)];
        for vma in replaced {
            let vmas = [file_vma(0x10000, 0x14000, 0x200000, 7), Vma { start: 0x14000, ..vma }];
            let e = run_plan(&list, &vmas, &regions).unwrap_err();
            assert!(matches!(e, Error::StaleRegion { index: 1, at: 0x15000, .. }), "{vma:?}: {e:?}");
        }
    }

    #[test]
    fn a_run_across_vmas_allows_what_all_of_them_allow() {
        let ro = Vma { prot: libc::PROT_READ, ..file_vma(0x14000, 0x18000, 0x4000, 7) };
        let vmas = [file_vma(0x10000, 0x14000, 0, 7), ro];
        let regions = [span(0x10000, 0x18000, 0, 7)];
        let p = run_plan(&[iov(0x13000, 2 * P)], &vmas, &regions).unwrap();
        assert_eq!((p.runs.len(), p.runs[0].prot(), p.prot), (1, libc::PROT_READ, libc::PROT_READ));
        let p = run_plan(&[iov(0x11000, P)], &vmas, &regions).unwrap();
        assert_eq!(p.prot, RW);
    }

    #[test]
    fn duplicates_and_reverse_order_are_separate_runs() {
        let vmas = [shared(0x10000, 0x20000)];
        let list = [iov(0x13000, P), iov(0x12000, P), iov(0x12000, P)];
        let p = run_plan(&list, &vmas, &[]).unwrap();
        assert_eq!(
            p.runs.iter().map(|r| (r.src(), r.dst())).collect::<Vec<_>>(),
            [(0x13000, 0), (0x12000, P), (0x12000, 2 * P)]
        );
    }

    /// The fast path (four segments at a time, then one by one) against the plainest
    /// reading of the rules, on lists of adjacent, jumping and empty segments in one
    /// mapping: the same runs (source, length, first segment), segments and bytes.
    #[test]
    fn the_fast_path_coalesces_exactly_what_adjacency_says() {
        use proptest::prelude::*;
        let base = 0x10_0000;
        let vmas = [shared(base, base + 256 * P)];
        // (jump?, pages, empty?) per segment.
        let seg = (any::<bool>(), 1..3usize, prop::bool::weighted(0.15));
        proptest!(ProptestConfig::with_cases(400), |(list in prop::collection::vec(seg, 1..40), start in 0..8usize)| {
            let mut at = base + start * P;
            let iovs: Vec<libc::iovec> = list
                .iter()
                .map(|&(jump, pages, empty)| {
                    if jump {
                        at += P;
                    }
                    let v = iov(at, if empty { 0 } else { pages * P });
                    at += v.iov_len;
                    v
                })
                .collect();
            prop_assume!(iovs.iter().any(|v| v.iov_len > 0));
            let p = run_plan(&iovs, &vmas, &[]).unwrap();
            // By hand: a non-empty segment continues the run iff it starts where it ends.
            let mut want: Vec<(usize, usize, usize)> = Vec::new(); // (src, len, first)
            for (k, v) in iovs.iter().enumerate().filter(|(_, v)| v.iov_len > 0) {
                match want.last_mut() {
                    Some(r) if r.0 + r.1 == v.iov_base as usize => r.1 += v.iov_len,
                    _ => want.push((v.iov_base as usize, v.iov_len, k)),
                }
            }
            let got: Vec<_> = p.runs.iter().map(|r| (r.src(), r.len(), r.first())).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(p.segments, iovs.iter().filter(|v| v.iov_len > 0).count());
            prop_assert_eq!(p.len, iovs.iter().map(|v| v.iov_len).sum::<usize>());
        });
    }

    #[test]
    fn a_segment_past_the_window_in_a_group_of_four_leaves_the_fast_path() {
        // Five adjacent pages, the VMA ends after the fourth: wherever the group of four
        // starts, the fifth is cut at the VMA's end and the rest is not mapped.
        for lead in 0..4 {
            let base = 0x10_0000;
            let vmas = [shared(base, base + (lead + 4) * P)];
            let list: Vec<_> = (0..lead + 5).map(|k| iov(base + k * P, P)).collect();
            let e = run_plan(&list, &vmas, &[]).unwrap_err();
            assert!(matches!(e, Error::NotMapped { index } if index == lead + 4), "lead {lead}: {e:?}");
            let p = run_plan(&list[..lead + 4], &vmas, &[]).unwrap();
            assert_eq!((p.runs.len(), p.len, p.segments), (1, (lead + 4) * P, lead + 4));
        }
    }

    #[test]
    fn a_source_that_lies_cannot_hang_the_planner() {
        struct Liar;
        impl VmaSource for Liar {
            fn vma_at(&mut self, _: usize) -> std::io::Result<Option<Vma>> {
                Ok(Some(Vma { start: 0, end: 0x1000, prot: RW, shared: true, page_size: P, ..Default::default() }))
            }
        }
        let e = plan(&[iov(0x5000, P)], &mut Liar, &[], P).unwrap_err();
        assert!(matches!(e, Error::NotMapped { index: 0 }));
    }
}
