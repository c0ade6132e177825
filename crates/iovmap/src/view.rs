//! The contiguous view: an RAII mapping that unmaps on drop.

/// What building a view took.
///
/// ```
/// # use iovmap::MapStats;
/// let s = MapStats { segments: 262_144, runs: 1, cloned: 1, fd_mapped: 0, syscalls: 1 };
/// assert_eq!(s.runs, s.cloned + s.fd_mapped);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapStats {
    /// Non-empty segments in the list.
    pub segments: usize,
    /// Mapping operations after coalescing.
    pub runs: usize,
    /// Runs placed by cloning the source mapping (mremap).
    pub cloned: usize,
    /// Runs placed by mapping a registered fd (mmap).
    pub fd_mapped: usize,
    /// mremap/mmap attempts for runs, refused clones included (not the reservation, the
    /// final mprotect, or populate).
    pub syscalls: usize,
}

/// One contiguous mapping of all the pieces of a list. Dropping it unmaps all of it.
///
/// The view aliases the original memory: writes through it are seen in the source and
/// the other way round, and the guest may change the bytes at any time, so the view
/// gives out raw pointers rather than `&[u8]`.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // Two pages of shared memory, listed in reverse order.
/// let page = 4096;
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
    base: usize,
    map_len: usize,
    lead: usize,
    len: usize,
    stats: MapStats,
}

// SAFETY: a View owns its address range exclusively (it was reserved for it and nothing
// else maps there) and only hands out raw pointers; sharing or sending it across threads
// cannot create a data race in safe code. Drop unmaps with a syscall that is thread-safe.
unsafe impl Send for View {}
// SAFETY: as above; `&View` only reads plain fields.
unsafe impl Sync for View {}

impl View {
    pub(crate) fn new(range: (usize, usize), lead: usize, len: usize, stats: MapStats) -> Self {
        View { base: range.0, map_len: range.1, lead, len, stats }
    }

    /// The first byte of the view: the first byte of the first segment.
    ///
    /// ```
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), 4 * page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) } as *mut u8;
    /// # let view = iovmap::map(&[libc::iovec { iov_base: unsafe { ram.add(100) }.cast(), iov_len: 200 }])?;
    /// unsafe { view.as_ptr().write_volatile(1) };
    /// assert_eq!(unsafe { ram.add(100).read_volatile() }, 1);
    /// # drop(view);
    /// # unsafe { libc::munmap(ram.cast(), 4 * page) };
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    pub fn as_ptr(&self) -> *mut u8 {
        (self.base + self.lead) as *mut u8
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
        self.base..self.base + self.map_len
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: the range belongs to this view alone (see `Send`), and no reference into
        // it can outlive `self` in safe code: the view hands out only raw pointers.
        if let Err(e) = unsafe { crate::sys::unmap(self.base, self.map_len) } {
            log::error!("iovmap: munmap of a view at {:#x} failed: {e}", self.base);
        }
    }
}
