//! The contiguous view: an RAII mapping that unmaps on drop.

use std::ptr::NonNull;

use crate::dmabuf::DmaBuf;
use crate::options::Access;

/// What building a view took.
///
/// `#[non_exhaustive]`: read its fields; later versions add counters (you cannot build
/// one outside iovmap, which is what lets them).
///
/// ```
/// # let page = iovmap::page_size();
/// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), 4 * page, libc::PROT_READ | libc::PROT_WRITE,
/// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
/// let iov = |p: usize| libc::iovec { iov_base: unsafe { ram.add(p * page) }.cast(), iov_len: page };
/// let view = iovmap::map(&[iov(0), iov(1), iov(3)])?;
/// let s = view.stats();
/// assert_eq!((s.segments, s.runs, s.cloned, s.fd_mapped, s.syscalls), (3, 2, 2, 0, 2));
/// assert_eq!(s.runs, s.cloned + s.fd_mapped + s.kernel_built);
/// # drop(view);
/// # unsafe { libc::munmap(ram.cast(), 4 * page) };
/// # Ok::<(), iovmap::Error>(())
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapStats {
    /// Non-empty segments in the list.
    pub segments: usize,
    /// Mapping operations after coalescing.
    pub runs: usize,
    /// Runs placed by cloning the source mapping (mremap).
    pub cloned: usize,
    /// Runs placed by mapping a registered fd (mmap), device memory included.
    pub fd_mapped: usize,
    /// Placement syscalls: mremap/mmap attempts for runs, refused clones included, and
    /// for kernel-built runs each `UDMABUF_CREATE_LIST` and each mmap of a dma-buf (not the
    /// reservation, the final mprotect, or populate).
    pub syscalls: usize,
    /// Runs placed through udmabuf (kernel-built), included in neither `cloned` nor
    /// `fd_mapped`.
    pub kernel_built: usize,
    /// dma-bufs made for the view (see [`View::dmabufs`]).
    pub dmabufs: usize,
    /// Why automatic placement did not give runs it would have to udmabuf (the device is
    /// missing, or refused them); `None` when it did, or had nothing for it.
    pub kernel_built_declined: Option<crate::KernelBuiltError>,
    /// Bytes of the list's source that lay in ranges armed with a userfaultfd (MISSING or
    /// MINOR, see [`userfaultfd`](crate::userfaultfd)) and were faulted in through the
    /// source, waiting for the monitor, before anything was mapped. 0 when nothing armed.
    pub monitor_resolved: usize,
}

/// One contiguous mapping of all the pieces of a list. Dropping it unmaps all of it.
///
/// The view aliases the original memory: writes through it are seen in the source and
/// the other way round, and the guest may change the bytes at any time, so the view
/// gives out raw pointers (and, with the `vm-memory` feature, volatile slices) rather
/// than `&[u8]`. A read-only view gives no `*mut u8` at all.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // Two pages of shared memory, listed in reverse order.
/// let page = iovmap::page_size();
/// let ram = unsafe {
///     libc::mmap(std::ptr::null_mut(), 2 * page, libc::PROT_READ | libc::PROT_WRITE,
///                libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
/// } as *mut u8;
/// unsafe { ram.write(b'A'); ram.add(page).write(b'B') };
/// let iov = [
///     libc::iovec { iov_base: unsafe { ram.add(page) }.cast(), iov_len: page },
///     libc::iovec { iov_base: ram.cast(), iov_len: page },
/// ];
/// let view = iovmap::map(&iov)?;
/// assert_eq!(view.len(), 2 * page);
/// assert_eq!(unsafe { view.as_ptr().read_volatile() }, b'B');
/// assert_eq!(unsafe { view.as_ptr().add(page).read_volatile() }, b'A');
/// drop(view); // unmapped; the source is untouched
/// # unsafe { libc::munmap(ram.cast(), 2 * page) };
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct View {
    base: NonNull<u8>,
    map_len: usize,
    lead: usize,
    len: usize,
    stats: MapStats,
    access: Access,
    /// The dma-bufs of the kernel-built runs: their mappings are part of the range.
    dmabufs: Vec<DmaBuf>,
}

// SAFETY: a View owns its address range exclusively (it was reserved for it and nothing
// else maps there) and only hands out raw pointers and volatile slices; sharing or
// sending it across threads cannot create a data race in safe code. Drop unmaps with a
// syscall that is thread-safe.
unsafe impl Send for View {}
// SAFETY: as above; `&View` only reads plain fields.
unsafe impl Sync for View {}

impl View {
    /// A view of the mapped range `range` (owned from now on), whose first byte is `lead`
    /// bytes into it.
    pub(crate) fn new(
        range: (NonNull<u8>, usize),
        lead: usize,
        len: usize,
        stats: MapStats,
        access: Access,
        dmabufs: Vec<DmaBuf>,
    ) -> Self {
        debug_assert!(lead + len <= range.1);
        View { base: range.0, map_len: range.1, lead, len, stats, access, dmabufs }
    }

    /// The dma-bufs udmabuf built for the view's kernel-built runs, in view order, each
    /// with where it lies in [`View::mapped_range`]. Empty unless runs were kernel-built;
    /// a view built whole through udmabuf ([`MapOptions::kernel_built`]) is covered by
    /// them, and a list that fits one buffer (udmabuf's `list_limit` entries and
    /// `size_limit_mb`) has exactly one. The view owns them: they are closed when it is
    /// dropped; `try_clone_to_owned` one to keep it longer.
    ///
    /// ```
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
    /// let view = iovmap::map(&[libc::iovec { iov_base: ram.cast(), iov_len: page }])?;
    /// assert!(view.dmabufs().is_empty()); // cloned: nothing kernel-built
    /// # drop(view);
    /// # unsafe { libc::munmap(ram.cast(), page) };
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    ///
    /// [`MapOptions::kernel_built`]: crate::MapOptions::kernel_built
    pub fn dmabufs(&self) -> &[DmaBuf] {
        &self.dmabufs
    }

    /// The first byte of the view: the first byte of the first segment.
    ///
    /// ```
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), 4 * page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
    /// # unsafe { ram.add(100).write(9) };
    /// let view = iovmap::map(&[libc::iovec { iov_base: unsafe { ram.add(100) }.cast(), iov_len: 200 }])?;
    /// assert_eq!(unsafe { view.as_ptr().read_volatile() }, 9);
    /// # drop(view);
    /// # unsafe { libc::munmap(ram.cast(), 4 * page) };
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    pub fn as_ptr(&self) -> *const u8 {
        // `lead` is less than a page into the mapped range (see `new`).
        self.base.as_ptr().wrapping_add(self.lead)
    }

    /// The first byte of the view, for writing; `None` for a read-only view, through
    /// which any write would fault.
    ///
    /// ```
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), 4 * page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
    /// let iov = [libc::iovec { iov_base: unsafe { ram.add(100) }.cast(), iov_len: 200 }];
    /// let view = iovmap::map(&iov)?;
    /// unsafe { view.as_mut_ptr().unwrap().write_volatile(1) };
    /// assert_eq!(unsafe { ram.add(100).read_volatile() }, 1);
    /// let ro = iovmap::Remapper::new().map_with(&iov, iovmap::MapOptions::new().read_only())?;
    /// assert!(ro.as_mut_ptr().is_none());
    /// # drop((view, ro));
    /// # unsafe { libc::munmap(ram.cast(), 4 * page) };
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    pub fn as_mut_ptr(&self) -> Option<*mut u8> {
        (self.access == Access::ReadWrite).then(|| self.base.as_ptr().wrapping_add(self.lead))
    }

    /// The access the view was mapped with.
    ///
    /// ```
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
    /// let view = iovmap::map(&[libc::iovec { iov_base: ram.cast(), iov_len: page }])?;
    /// assert_eq!(view.access(), iovmap::Access::ReadWrite);
    /// # drop(view);
    /// # unsafe { libc::munmap(ram.cast(), page) };
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    pub fn access(&self) -> Access {
        self.access
    }

    /// The exact byte length of the view: the sum of the segment lengths.
    ///
    /// ```
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), 4 * page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
    /// # let view = iovmap::map(&[libc::iovec { iov_base: unsafe { ram.add(100) }.cast(), iov_len: 200 }])?;
    /// assert_eq!(view.len(), 200);
    /// # drop(view);
    /// # unsafe { libc::munmap(ram.cast(), 4 * page) };
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: an empty list is refused with [`Error::Empty`](crate::Error::Empty).
    ///
    /// ```
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), 4 * page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
    /// # let view = iovmap::map(&[libc::iovec { iov_base: unsafe { ram.add(100) }.cast(), iov_len: 200 }])?;
    /// assert!(!view.is_empty());
    /// # drop(view);
    /// # unsafe { libc::munmap(ram.cast(), 4 * page) };
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What building the view took.
    ///
    /// ```
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), 4 * page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
    /// # let view = iovmap::map(&[libc::iovec { iov_base: unsafe { ram.add(100) }.cast(), iov_len: 200 }])?;
    /// assert_eq!((view.stats().runs, view.stats().cloned), (1, 1));
    /// # drop(view);
    /// # unsafe { libc::munmap(ram.cast(), 4 * page) };
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    pub fn stats(&self) -> &MapStats {
        &self.stats
    }

    /// The whole mapped range, from the page boundary below [`View::as_ptr`] to the end of
    /// the last page: what the view unmaps when dropped.
    ///
    /// ```
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), 4 * page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
    /// # let view = iovmap::map(&[libc::iovec { iov_base: unsafe { ram.add(100) }.cast(), iov_len: 200 }])?;
    /// assert_eq!(view.mapped_range().len(), page);
    /// assert_eq!(view.as_ptr() as usize - view.mapped_range().start, 100);
    /// # drop(view);
    /// # unsafe { libc::munmap(ram.cast(), 4 * page) };
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    pub fn mapped_range(&self) -> std::ops::Range<usize> {
        let base = self.base.as_ptr() as usize;
        base..base + self.map_len
    }
}

impl Drop for View {
    /// Unmaps the view, then closes its dma-bufs (the fields drop after this).
    fn drop(&mut self) {
        // SAFETY: the range belongs to this view alone (see `Send`), and no reference into
        // it can outlive `self` in safe code: the view hands out raw pointers, and slices
        // that borrow it.
        if let Err(e) = unsafe { crate::sys::unmap(self.base, self.map_len) } {
            log::error!("iovmap: munmap of a view at {:p} failed: {e}", self.base);
        }
    }
}
