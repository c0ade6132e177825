//! Kernel-built views: runs of registered memfds placed through udmabuf.
//!
//! `ioctl(/dev/udmabuf, UDMABUF_CREATE_LIST)` turns up to `list_limit` page-aligned
//! ranges of memfds (F_SEAL_SHRINK set, F_SEAL_WRITE not) into one dma-buf, and one mmap
//! of it is one VMA whatever the order of the pages: for a scattered list that is one
//! ioctl and one mmap per `list_limit` runs where the remap path makes one syscall per
//! run, and a dma-buf the VMM can hand to a GPU, a display or an encoder. The kernel pins
//! the pages while the buffer lives, and its mapping is pfn-mapped (it cannot be
//! prefaulted). It is also the only zero-copy way to view pieces of huge-page RAM smaller
//! than a huge page: the clone is refused and a hugetlb fd maps only whole huge pages.
//!
//! This module holds what is pure (which registered fds qualify, the module's limits,
//! which runs automatic placement gives the kernel, and how runs are cut into buffers);
//! `place.rs` makes the buffers and maps them.

use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::sync::OnceLock;

use crate::plan::{Plan, Run};
use crate::regions::RegionSpan;
use crate::sys;

/// Why udmabuf cannot build (part of) a view: in [`Error::KernelBuilt`](crate::Error),
/// and in [`MapStats::kernel_built_declined`](crate::MapStats) when automatic placement
/// fell back to the remap path.
///
/// ```
/// let why = iovmap::KernelBuiltError::NotSealed;
/// assert!(why.to_string().contains("MFD_ALLOW_SEALING"));
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KernelBuiltError {
    /// There is no `/dev/udmabuf`.
    #[error(
        "/dev/udmabuf does not exist (the kernel lacks CONFIG_UDMABUF, or the udmabuf module is not loaded: \
         modprobe udmabuf)"
    )]
    NoDevice,
    /// `/dev/udmabuf` cannot be opened.
    #[error("/dev/udmabuf cannot be opened ({}): give the VMM read-write access to it", std::io::Error::from_raw_os_error(*errno))]
    DeviceDenied {
        /// The errno of the open.
        errno: i32,
    },
    /// The memory is not a registered region.
    #[error("its memory is not registered: register the memfd that backs it (Remapper::register)")]
    NotRegistered,
    /// The registered fd is not a shmem or hugetlbfs file at all (a device BAR, a file on
    /// a disk filesystem).
    #[error(
        "its registered fd is not a memfd (a device BAR, or a file on a disk filesystem): udmabuf takes memfds only"
    )]
    NotMemfd,
    /// The memfd lacks `F_SEAL_SHRINK` (or the file is a tmpfs or hugetlbfs file opened by
    /// path, which can never be sealed).
    #[error(
        "memfd lacks F_SEAL_SHRINK: create guest RAM with MFD_ALLOW_SEALING and seal it \
         (fcntl F_ADD_SEALS, F_SEAL_SHRINK), as QEMU's memory-backend-memfd does by default; a tmpfs or \
         hugetlbfs file opened by path (memory-backend-file) can never be sealed"
    )]
    NotSealed,
    /// The memfd is sealed against writes.
    #[error("memfd is write-sealed (F_SEAL_WRITE or F_SEAL_FUTURE_WRITE), which udmabuf refuses")]
    WriteSealed,
    /// The kernel refused to build the buffer.
    #[error(
        "the kernel refused to build the buffer (UDMABUF_CREATE_LIST: {}); udmabuf's limits are list_limit \
         entries and size_limit_mb per buffer (/sys/module/udmabuf/parameters)",
        std::io::Error::from_raw_os_error(*errno)
    )]
    Refused {
        /// The errno of the ioctl.
        errno: i32,
    },
    /// vfio-pci will not export the BAR's ranges as a dma-buf (only
    /// [`Remapper::dmabufs`](crate::Remapper::dmabufs) exports BAR runs).
    #[error(
        "vfio-pci will not export this BAR as a dma-buf (VFIO_DEVICE_FEATURE_DMA_BUF: {}); the export needs Linux \
         6.19+ and a device whose BARs support peer-to-peer DMA",
        std::io::Error::from_raw_os_error(*errno)
    )]
    BarExportRefused {
        /// The errno of the ioctl.
        errno: i32,
    },
}

/// Whether udmabuf takes ranges of a registered fd, from its seals: what registration
/// records for each region (the kernel has the last word when the buffer is made).
pub(crate) fn eligibility(fd: BorrowedFd<'_>) -> Result<(), KernelBuiltError> {
    match sys::memfd_seals(fd) {
        // Not a shmem or hugetlbfs file at all (a device, a regular file).
        Err(_) => Err(KernelBuiltError::NotMemfd),
        // A memfd not yet sealed, one made without MFD_ALLOW_SEALING, or a file opened by
        // path (born with F_SEAL_SEAL alone): none has the seal udmabuf wants.
        Ok(seals) if seals & libc::F_SEAL_SHRINK == 0 => Err(KernelBuiltError::NotSealed),
        Ok(seals) if seals & (libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE) != 0 => {
            Err(KernelBuiltError::WriteSealed)
        }
        Ok(_) => Ok(()),
    }
}

/// udmabuf's limits per buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Entries per `UDMABUF_CREATE_LIST` (`list_limit`).
    pub items: usize,
    /// Bytes per buffer (`size_limit_mb` MiB).
    pub bytes: usize,
}

impl Limits {
    /// The kernel's defaults.
    pub const DEFAULT: Limits = Limits { items: 1024, bytes: 64 << 20 };
}

/// The module's limits, read once from /sys/module/udmabuf/parameters (present when
/// udmabuf is loaded or built in), the kernel's defaults otherwise.
pub(crate) fn limits() -> Limits {
    static LIMITS: OnceLock<Limits> = OnceLock::new();
    *LIMITS.get_or_init(|| {
        let read = |p| sys::read_number(p).ok().and_then(|n| usize::try_from(n).ok()).filter(|&n| n > 0);
        Limits {
            items: read(c"/sys/module/udmabuf/parameters/list_limit").unwrap_or(Limits::DEFAULT.items),
            bytes: read(c"/sys/module/udmabuf/parameters/size_limit_mb")
                .and_then(|mb| mb.checked_mul(1 << 20))
                .unwrap_or(Limits::DEFAULT.bytes),
        }
    })
}

/// Automatic placement gives a stretch of consecutive eligible runs to the kernel when it
/// has at least this many runs (measured in a 7.2 guest under TCG, map + first touch +
/// drop, two runs: 8 scattered pages 1.1-1.2x faster through udmabuf, 6 pages 0.8-1.0x,
/// 4 pages 0.7-1.0x; below it, opening the device and one ioctl and one mmap cost more
/// than the clones; see docs/benchmarks.md, "Kernel-built views")...
pub(crate) const AUTO_MIN_RUNS: usize = 8;
/// ... and its runs are at most this long on average (in base pages): udmabuf pins every
/// page, which costs more than one clone of a long run (64 runs of 32 pages: 1.2-1.3x
/// faster through udmabuf; of 64 pages: 0.97-0.98x; W2, runs of 1 to 64 pages, 2x).
pub(crate) const AUTO_MAX_AVERAGE_PAGES: usize = 48;

/// One range of a memfd in a buffer: the region (for its fd), the file offset, the size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Item {
    pub region: usize,
    pub offset: u64,
    pub size: usize,
}

/// One dma-buf to make: where it goes in the view and its items.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Buffer {
    /// Offset in the reservation of its first byte.
    pub dst: usize,
    /// Bytes: the sum of its items.
    pub len: usize,
    /// Its items, in view order.
    pub items: Vec<Item>,
}

/// Cuts the runs of `plan` whose indices are in `runs` (each stretch of consecutive
/// runs, in view order; every run with an fd) into buffers under `limits`: a buffer
/// covers consecutive runs, a run longer than the size limit is split across buffers.
pub(crate) fn buffers(plan: &Plan, stretches: &[Range<usize>], limits: Limits, page: usize) -> Vec<Buffer> {
    // A buffer holds at most this many bytes, in whole pages.
    let max_bytes = (limits.bytes / page).max(1) * page;
    let max_items = limits.items.max(1);
    let mut out = Vec::new();
    for stretch in stretches {
        let mut open: Option<Buffer> = None;
        for run in &plan.runs[stretch.clone()] {
            let fd = run.fd().expect("kernel-built runs have a registered fd");
            let mut done = 0;
            while done < run.len() {
                let at = run.dst() + done;
                let full = open.as_ref().is_some_and(|b| b.items.len() == max_items || b.len == max_bytes);
                if full {
                    out.extend(open.take());
                }
                let b = open.get_or_insert_with(|| Buffer { dst: at, len: 0, items: Vec::new() });
                let size = (run.len() - done).min(max_bytes - b.len);
                b.items.push(Item { region: fd.region, offset: fd.offset + done as u64, size });
                b.len += size;
                done += size;
            }
        }
        out.extend(open);
    }
    out
}

/// The runs that can be kernel-built: registered runs of eligible regions.
pub(crate) fn eligible(run: &Run, spans: &[RegionSpan]) -> bool {
    run.fd().is_some_and(|fd| spans[fd.region].kernel_built)
}

/// Whether a run must be kernel-built: planned at the base page inside huge-page RAM
/// (see `plan_for_kernel_built`), which no fd mapping can place.
pub(crate) fn needed(run: &Run, spans: &[RegionSpan]) -> bool {
    run.fd().is_some_and(|fd| run.page_size() < spans[fd.region].page_size)
}

/// The stretches of runs automatic placement gives the kernel: every maximal stretch of
/// consecutive eligible runs that has at least [`AUTO_MIN_RUNS`] runs of at most
/// [`AUTO_MAX_AVERAGE_PAGES`] pages on average, and any stretch that holds a run only
/// the kernel can place.
pub(crate) fn automatic(plan: &Plan, spans: &[RegionSpan], page: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < plan.runs.len() {
        if !eligible(&plan.runs[at], spans) {
            at += 1;
            continue;
        }
        let start = at;
        while at < plan.runs.len() && eligible(&plan.runs[at], spans) {
            at += 1;
        }
        let stretch = &plan.runs[start..at];
        let pages: usize = stretch.iter().map(|r| r.len() / page).sum();
        let worth = stretch.len() >= AUTO_MIN_RUNS && pages <= stretch.len() * AUTO_MAX_AVERAGE_PAGES;
        if worth || stretch.iter().any(|r| needed(r, spans)) {
            out.push(start..at);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // lists of stretches, here of one
mod tests {
    use super::*;
    use crate::plan::{FileId, Vma, plan};

    const P: usize = 0x1000;

    fn world(pages: &[usize], region_pages: usize) -> (Plan, Vec<RegionSpan>) {
        let file = FileId { dev: 1, ino: 1 };
        let vma = Vma {
            start: 0x10_0000,
            end: 0x10_0000 + region_pages * P,
            prot: 3,
            shared: true,
            page_size: P,
            offset: 0,
            file,
        };
        let spans = vec![RegionSpan {
            start: vma.start,
            end: vma.end,
            file,
            page_size: P,
            mapped_file: file,
            kernel_built: true,
            ..RegionSpan::default()
        }];
        let iovs: Vec<libc::iovec> = pages
            .iter()
            .map(|&p| libc::iovec { iov_base: (vma.start + p * P) as *mut libc::c_void, iov_len: P })
            .collect();
        (plan(&iovs, &mut [vma][..], &spans, P).unwrap(), spans)
    }

    #[test]
    fn buffers_respect_both_limits_and_tile_the_runs() {
        // 10 scattered pages, then a run of 6 adjacent ones.
        let pages: Vec<usize> = (0..10).map(|i| 2 * i).chain(40..46).collect();
        let (p, _) = world(&pages, 64);
        assert_eq!(p.runs.len(), 11);
        let limits = Limits { items: 4, bytes: 3 * P };
        let bufs = buffers(&p, &[0..11], limits, P);
        let mut dst = 0;
        for b in &bufs {
            assert_eq!(b.dst, dst, "buffers tile the view");
            assert!(b.items.len() <= 4 && b.len <= 3 * P, "{b:?}");
            assert_eq!(b.len, b.items.iter().map(|i| i.size).sum::<usize>());
            dst += b.len;
        }
        assert_eq!(dst, p.map_len);
        // The 6-page run is cut at the size limit, and its pieces keep their offsets.
        let last: Vec<_> = bufs.iter().flat_map(|b| &b.items).skip(10).copied().collect();
        assert_eq!(
            last,
            [
                Item { region: 0, offset: 40 * P as u64, size: 2 * P },
                Item { region: 0, offset: 42 * P as u64, size: 3 * P },
                Item { region: 0, offset: 45 * P as u64, size: P }
            ]
        );
        // With the default limits, the whole list is one buffer: one dma-buf for the view.
        assert_eq!(buffers(&p, &[0..11], Limits::DEFAULT, P).len(), 1);
    }

    #[test]
    fn automatic_takes_scattered_stretches_and_leaves_long_runs_and_short_lists() {
        let scattered: Vec<usize> = (0..8).map(|i| 2 * i).collect();
        let (p, spans) = world(&scattered, 64);
        assert_eq!(automatic(&p, &spans, P), [0..8]);
        let (p, spans) = world(&scattered[..AUTO_MIN_RUNS - 1], 64);
        assert!(automatic(&p, &spans, P).is_empty(), "too few runs to be worth a buffer");
        let long: Vec<usize> = (0..8).flat_map(|r| r * 70..r * 70 + 64).collect();
        let (p, spans) = world(&long, 600);
        assert_eq!(p.runs.len(), 8);
        assert!(automatic(&p, &spans, P).is_empty(), "runs of 64 pages clone faster than they pin");
        let (p, mut spans) = world(&scattered, 64);
        spans[0].kernel_built = false;
        assert!(automatic(&p, &spans, P).is_empty(), "nothing eligible");
    }
}
