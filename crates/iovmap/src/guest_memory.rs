//! The vm-memory adapter (feature `vm-memory`, on by default): guest RAM described by
//! rust-vmm's [`GuestMemoryBackend`], guest-physical scatter lists, and volatile access
//! to views ([`VolatileMemory`] for [`View`]).

use std::os::fd::AsFd;

use vm_memory::volatile_memory::{self, VolatileMemory};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, VolatileSlice};

use crate::error::{Error, RegionContext, RegionError};
use crate::options::MapOptions;
use crate::remapper::Remapper;
use crate::view::View;
use crate::vma::ProcessVmas;

impl Remapper {
    /// A remapper with every file-backed region of `mem` registered (host address,
    /// length, file and start from its `FileOffset`), so that guest RAM the kernel will
    /// not clone (hugetlbfs) is mapped from its file. Regions without a file stay usable
    /// through the clone when they are shared mappings.
    ///
    /// ```
    /// use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
    /// # fn memfd(len: u64) -> std::fs::File {
    /// #     use std::os::fd::FromRawFd;
    /// #     let f = unsafe { std::fs::File::from_raw_fd(libc::memfd_create(c"ram".as_ptr(), libc::MFD_CLOEXEC)) };
    /// #     f.set_len(len).unwrap();
    /// #     f
    /// # }
    /// // Two RAM regions, each a memfd, with a hole between them.
    /// let mem = GuestMemoryMmap::<()>::from_ranges_with_files([
    ///     (GuestAddress(0), 0x10000, Some(FileOffset::new(memfd(0x10000), 0))),
    ///     (GuestAddress(0x100000), 0x10000, Some(FileOffset::new(memfd(0x10000), 0))),
    /// ])
    /// .unwrap();
    /// let remapper = iovmap::Remapper::from_guest_memory(&mem)?;
    /// assert_eq!(remapper.regions().count(), 2);
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidRegion`] naming the guest region that cannot be registered (no host
    /// address, a private mapping, a file shorter than the region...). Nothing stays
    /// registered.
    pub fn from_guest_memory<M: GuestMemoryBackend>(mem: &M) -> Result<Remapper, Error> {
        let mut remapper = Remapper::new();
        let mut vmas = ProcessVmas::new();
        for region in mem.iter() {
            let Some(file) = region.file_offset() else { continue };
            let context = RegionContext::GuestMemory { gpa: vm_memory::Address::raw_value(&region.start_addr()) };
            let len = usize::try_from(region.len()).map_err(|_| Error::TooLarge)?;
            let host = region.get_host_address(MemoryRegionAddress(0)).map_err(|_| Error::InvalidRegion {
                addr: 0,
                len,
                offset: file.start(),
                context,
                kind: RegionError::NoHostAddress,
            })?;
            let fd = file.file().as_fd();
            let anon = crate::remapper::anon_file_id();
            let span = remapper.check_region(host as usize, len, fd, file.start(), &mut vmas, anon, context)?;
            remapper.commit(&[(span, Some(fd))], context, None)?;
        }
        Ok(remapper)
    }

    /// Maps a guest-physical scatter list (what virtio-gpu's RESOURCE_ATTACH_BACKING
    /// carries) into one view: each `(address, length)` entry is translated to host
    /// memory through `mem`, split where it crosses from one guest region into the next,
    /// and mapped as [`Remapper::map_with`] does.
    ///
    /// Errors name the entry of `ranges` at fault (not the host iovec it became).
    ///
    /// ```
    /// use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
    /// # fn memfd(len: u64) -> std::fs::File {
    /// #     use std::os::fd::FromRawFd;
    /// #     let f = unsafe { std::fs::File::from_raw_fd(libc::memfd_create(c"ram".as_ptr(), libc::MFD_CLOEXEC)) };
    /// #     f.set_len(len).unwrap();
    /// #     f
    /// # }
    /// let mem = GuestMemoryMmap::<()>::from_ranges_with_files([
    ///     (GuestAddress(0), 0x10000, Some(FileOffset::new(memfd(0x10000), 0))),
    ///     (GuestAddress(0x10000), 0x10000, Some(FileOffset::new(memfd(0x10000), 0))),
    /// ])
    /// .unwrap();
    /// mem.write_obj(0xabu8, GuestAddress(0xf000)).unwrap();
    /// mem.write_obj(0xcdu8, GuestAddress(0x10000)).unwrap();
    /// let remapper = iovmap::Remapper::from_guest_memory(&mem)?;
    /// // One entry that crosses from the first region into the second.
    /// let view = remapper.map_guest(&mem, &[(GuestAddress(0xf000), 0x2000)], Default::default())?;
    /// let slice = view.as_volatile_slice();
    /// assert_eq!(slice.load::<u8>(0, std::sync::atomic::Ordering::Relaxed).unwrap(), 0xab);
    /// assert_eq!(slice.load::<u8>(0x1000, std::sync::atomic::Ordering::Relaxed).unwrap(), 0xcd);
    /// // An address outside guest memory is refused, naming the entry.
    /// let e = remapper.map_guest(&mem, &[(GuestAddress(0), 0x1000), (GuestAddress(0x40000), 0x1000)], Default::default());
    /// assert!(matches!(e, Err(iovmap::Error::NotInGuestMemory { index: 1 })));
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::NotInGuestMemory`] for an entry that leaves guest memory (or wraps), and
    /// everything [`Remapper::map_with`] returns, with the index of the entry.
    pub fn map_guest<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        ranges: &[(GuestAddress, usize)],
        opts: MapOptions,
    ) -> Result<View, Error> {
        let (iovs, entry_of) = translate(mem, ranges)?;
        self.map_with(&iovs, opts).map_err(|e| e.map_index(|i| entry_of[i]))
    }
}

/// Translates a guest scatter list to host iovecs with vm-memory's `get_slices`, which
/// splits each entry at guest region boundaries. Returns the iovecs and, for each, the
/// index of the entry it came from.
fn translate<M: GuestMemoryBackend>(
    mem: &M,
    ranges: &[(GuestAddress, usize)],
) -> Result<(Vec<libc::iovec>, Vec<usize>), Error> {
    let mut iovs = Vec::with_capacity(ranges.len());
    let mut entry_of = Vec::with_capacity(ranges.len());
    for (index, &(start, len)) in ranges.iter().enumerate() {
        for slice in mem.get_slices(start, len) {
            let slice = slice.map_err(|_| Error::NotInGuestMemory { index })?;
            iovs.push(libc::iovec { iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(), iov_len: slice.len() });
            entry_of.push(index);
        }
    }
    Ok((iovs, entry_of))
}

/// Volatile access to a view, bounds-checked, as to guest memory: the guest may write the
/// view's memory at any time, so it is read and written with volatile accesses only.
///
/// A write through a slice of a read-only view faults (SIGSEGV), as a write to read-only
/// guest memory would: check [`View::access`] before writing.
///
/// ```
/// use vm_memory::{Bytes, VolatileMemory};
/// let page = iovmap::page_size();
/// let ram = unsafe {
///     libc::mmap(std::ptr::null_mut(), 2 * page, libc::PROT_READ | libc::PROT_WRITE,
///                libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
/// };
/// unsafe { (ram as *mut u32).add(3).write(0xfeed_f00d) };
/// let view = iovmap::map(&[libc::iovec { iov_base: ram, iov_len: 2 * page }])?;
/// let word = view.get_ref::<u32>(12).unwrap();
/// assert_eq!(word.load(), 0xfeed_f00d);
/// view.get_slice(page, 8).unwrap().write_obj(7u64, 0).unwrap();
/// assert_eq!(unsafe { (ram as *const u64).add(page / 8).read_volatile() }, 7);
/// assert!(view.get_slice(2 * page - 4, 8).is_err()); // past the end
/// # drop(view);
/// # unsafe { libc::munmap(ram, 2 * page) };
/// # Ok::<(), iovmap::Error>(())
/// ```
impl VolatileMemory for View {
    type B = ();

    fn len(&self) -> usize {
        View::len(self)
    }

    fn get_slice(&self, offset: usize, count: usize) -> volatile_memory::Result<VolatileSlice<'_>> {
        let end = volatile_memory::compute_offset(offset, count)?;
        if end > View::len(self) {
            return Err(volatile_memory::Error::OutOfBounds { addr: end });
        }
        // SAFETY: `[as_ptr() + offset, + count)` lies in the view (checked just above), which
        // is mapped for as long as `self` lives: it unmaps only on drop, and the slice
        // borrows `self`. VolatileSlice only performs volatile accesses, which is what
        // memory shared with a guest requires. The pointer is cast to `*mut` for the slice
        // type; a read-only view's slice faults on write (documented above), it does not
        // corrupt memory.
        Ok(unsafe { VolatileSlice::new(self.as_ptr().cast_mut().add(offset), count) })
    }
}

impl View {
    /// The whole view as a [`VolatileSlice`] (what [`VolatileMemory::as_volatile_slice`]
    /// gives, without importing the trait).
    ///
    /// ```
    /// use vm_memory::Bytes;
    /// let page = iovmap::page_size();
    /// let ram = unsafe {
    ///     libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ | libc::PROT_WRITE,
    ///                libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
    /// };
    /// let view = iovmap::map(&[libc::iovec { iov_base: ram, iov_len: page }])?;
    /// view.as_volatile_slice().write_obj(0x1234_5678u32, 8).unwrap();
    /// assert_eq!(unsafe { (ram as *const u32).add(2).read_volatile() }, 0x1234_5678);
    /// # drop(view);
    /// # unsafe { libc::munmap(ram, page) };
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    pub fn as_volatile_slice(&self) -> VolatileSlice<'_> {
        self.get_slice(0, View::len(self)).expect("the whole view is in bounds")
    }
}
