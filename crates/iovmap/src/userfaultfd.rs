//! Guest RAM a userfaultfd monitor owns: the process-wide record of armed ranges, and the
//! guard every map runs against it.
//!
//! A VMM hands guest RAM to a userfaultfd monitor at the moments that matter most:
//! postcopy migration (MISSING: a page not yet received is a hole the monitor fills with
//! `UFFDIO_COPY`), snapshot restore from shmem (MINOR: the page cache holds pages the
//! monitor must approve with `UFFDIO_CONTINUE`) and live snapshot (WP: every write must
//! reach the monitor first). A view is a new mapping (a clone, an fd mapping, a dma-buf)
//! that does not carry the registration: through it, a missing page would be zero-filled
//! without asking the monitor (whose later `UFFDIO_COPY` then fails with EEXIST), an
//! unapproved page read as it stands, and a write land unseen by the snapshot.
//!
//! The kernel tells no one cheaply whether a range is registered (`/proc/self/smaps`
//! VmFlags are exact but walk every page table of the process; PROCMAP_QUERY has no
//! userfaultfd bit; a registration of one's own to test would take the range away from
//! the monitor), so the VMM says so, through iovmap:
//!
//! - [`register`] and [`unregister`] make the `UFFDIO_REGISTER`/`UFFDIO_UNREGISTER` ioctls
//!   and keep the record in step: the one call a VMM cannot forget;
//! - [`declare_armed`] and [`declare_disarmed`] only keep the record, for a VMM that makes
//!   the ioctls itself (QEMU's postcopy and background-snapshot code).
//!
//! Every map ([`Remapper::map_with`](crate::Remapper::map_with), the free
//! [`map`](crate::map), [`Remapper::dmabufs`](crate::Remapper::dmabufs)) consults the
//! record after planning and before anything is placed. With nothing armed that is one
//! atomic load. Otherwise, for the pages of the list that lie in armed ranges:
//!
//! - WP: a view that can write (a read-write view, or dma-bufs, which an importer may
//!   write) is refused with [`Error::WriteProtected`],
//!   naming the first such segment; a read-only view is built;
//! - MISSING and MINOR: the pages are faulted in through the *source* mapping, the one
//!   the monitor registered (`madvise(MADV_POPULATE_READ)`), which raises the monitor's
//!   events and waits until it has placed or approved every page. Only then is the view
//!   made, so it never shows a page the monitor has not placed or approved, and the
//!   monitor never finds one of its pages already there.
//!
//! The wrappers keep the record a superset of what the kernel has armed: [`register`]
//! records before the ioctl (and takes the record back if the kernel refuses), and
//! [`unregister`] forgets after it.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::ops::{BitOr, BitOrAssign};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Operation};
use crate::sys;

/// The modes of a userfaultfd registration, as `UFFDIO_REGISTER_MODE_*` encodes them.
///
/// ```
/// use iovmap::userfaultfd::Modes;
/// let m = Modes::MISSING | Modes::WP;
/// assert!(m.contains(Modes::WP) && !m.contains(Modes::MINOR));
/// assert_eq!(m.bits(), 3);
/// assert_eq!(Modes::from_bits(4), Some(Modes::MINOR));
/// assert_eq!(Modes::from_bits(8), None);
/// assert_eq!(format!("{m:?}"), "MISSING | WP");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Modes(u64);

impl Modes {
    /// No mode: nothing armed.
    pub const NONE: Modes = Modes(0);
    /// `UFFDIO_REGISTER_MODE_MISSING`: faults on pages not present (postcopy migration).
    pub const MISSING: Modes = Modes(1);
    /// `UFFDIO_REGISTER_MODE_WP`: faults on writes to write-protected pages (live snapshot).
    pub const WP: Modes = Modes(2);
    /// `UFFDIO_REGISTER_MODE_MINOR`: faults on pages present in the page cache but not
    /// mapped (snapshot restore from shmem or hugetlbfs).
    pub const MINOR: Modes = Modes(4);
    const ALL: u64 = 7;

    /// The `UFFDIO_REGISTER_MODE_*` bits.
    ///
    /// ```
    /// assert_eq!(iovmap::userfaultfd::Modes::MINOR.bits(), 4);
    /// ```
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// The modes `bits` stand for, or `None` if it has bits no mode has.
    ///
    /// ```
    /// use iovmap::userfaultfd::Modes;
    /// assert_eq!(Modes::from_bits(1), Some(Modes::MISSING));
    /// ```
    pub const fn from_bits(bits: u64) -> Option<Modes> {
        if bits & !Self::ALL == 0 { Some(Modes(bits)) } else { None }
    }

    /// Whether every mode of `other` is in `self`.
    ///
    /// ```
    /// use iovmap::userfaultfd::Modes;
    /// assert!((Modes::MISSING | Modes::MINOR).contains(Modes::MINOR));
    /// ```
    pub const fn contains(self, other: Modes) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether `self` and `other` share a mode.
    ///
    /// ```
    /// use iovmap::userfaultfd::Modes;
    /// assert!((Modes::MISSING | Modes::WP).intersects(Modes::WP | Modes::MINOR));
    /// ```
    pub const fn intersects(self, other: Modes) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether no mode is set.
    ///
    /// ```
    /// assert!(iovmap::userfaultfd::Modes::NONE.is_empty());
    /// ```
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl BitOr for Modes {
    type Output = Modes;
    fn bitor(self, rhs: Modes) -> Modes {
        Modes(self.0 | rhs.0)
    }
}

impl BitOrAssign for Modes {
    fn bitor_assign(&mut self, rhs: Modes) {
        self.0 |= rhs.0;
    }
}

impl fmt::Debug for Modes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("NONE");
        }
        let names = [(Modes::MISSING, "MISSING"), (Modes::WP, "WP"), (Modes::MINOR, "MINOR")];
        let set: Vec<&str> = names.iter().filter(|(m, _)| self.contains(*m)).map(|(_, n)| *n).collect();
        f.write_str(&set.join(" | "))
    }
}

/// One armed range of the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Armed {
    end: usize,
    modes: Modes,
}

/// The armed ranges by start address: disjoint, none empty, none with no mode.
static RECORD: RwLock<BTreeMap<usize, Armed>> = RwLock::new(BTreeMap::new());

/// Whether the record holds anything: what every map reads first.
static ANY: AtomicBool = AtomicBool::new(false);

fn read() -> RwLockReadGuard<'static, BTreeMap<usize, Armed>> {
    // A panic while the lock was held cannot leave the map inconsistent (every change is
    // one BTreeMap call that completed or not): carry on with it.
    RECORD.read().unwrap_or_else(|e| e.into_inner())
}

fn write() -> RwLockWriteGuard<'static, BTreeMap<usize, Armed>> {
    RECORD.write().unwrap_or_else(|e| e.into_inner())
}

/// Sets the modes of `[start, end)` in `record` to `modes` (none: forgets the range), and
/// returns what the range held before, to put back if the kernel refuses.
fn set(record: &mut BTreeMap<usize, Armed>, start: usize, end: usize, modes: Modes) -> Vec<(usize, Armed)> {
    let overlapping: Vec<(usize, Armed)> =
        record.range(..end).rev().take_while(|(_, a)| a.end > start).map(|(&s, &a)| (s, a)).collect();
    let mut before = Vec::with_capacity(overlapping.len());
    for (s, a) in overlapping {
        record.remove(&s);
        if s < start {
            record.insert(s, Armed { end: start, ..a });
        }
        if a.end > end {
            record.insert(end, a);
        }
        before.push((s.max(start), Armed { end: a.end.min(end), ..a }));
    }
    if !modes.is_empty() {
        record.insert(start, Armed { end, modes });
    }
    before
}

/// Sets the modes of `[start, end)` in the process's record (see [`set`]).
fn apply(start: usize, end: usize, modes: Modes) -> Vec<(usize, Armed)> {
    let mut record = write();
    let before = set(&mut record, start, end, modes);
    ANY.store(!record.is_empty(), Ordering::Release);
    before
}

/// `[addr, addr + len)` as a range, or EINVAL for an empty or wrapping one.
fn range_of(addr: *const u8, len: usize) -> io::Result<(usize, usize)> {
    let start = addr as usize;
    match start.checked_add(len) {
        Some(end) if len > 0 => Ok((start, end)),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

/// Registers `[addr, addr + len)` with the userfaultfd `uffd` in `modes`
/// (`ioctl(uffd, UFFDIO_REGISTER)`) and records it as armed, so that no view of it shows
/// a page the monitor has not placed or approved, and no view can write behind a
/// write-protecting monitor. Returns the `ioctls` the kernel reports for the range
/// (`1 << _UFFDIO_COPY` and the like).
///
/// The range is recorded before the ioctl and the record is taken back if the kernel
/// refuses: the record always covers at least what the kernel has armed. Register
/// through iovmap (or [`declare_armed`]) before the monitor starts serving, and make maps
/// of the range from threads other than the monitor's (a map waits for the monitor).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
/// # let page = iovmap::page_size();
/// # let len = 4 * page;
/// # let memfd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
/// # assert!(memfd >= 0 && unsafe { libc::ftruncate(memfd, len as i64) } == 0);
/// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
/// #     libc::MAP_SHARED, memfd, 0) } as *mut u8;
/// # unsafe { ram.write_bytes(7, len) }; // every page present: no monitor thread needed here
/// # // A userfaultfd (UFFD_USER_MODE_ONLY: no privilege needed) after its API handshake.
/// # let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | 1) };
/// # if fd < 0 { eprintln!("no userfaultfd here"); return Ok(()) }
/// # let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
/// # let mut api = [0xaau64, 0, 0];
/// # assert_eq!(unsafe { libc::ioctl(uffd.as_raw_fd(), 0xc018_aa3f, api.as_mut_ptr()) }, 0);
/// use iovmap::userfaultfd::{self, Modes};
/// use std::os::fd::AsFd;
/// // Postcopy destination: guest RAM is the monitor's until every page has arrived.
/// userfaultfd::register(uffd.as_fd(), ram, len, Modes::MISSING)?;
/// let iov = [libc::iovec { iov_base: ram.cast(), iov_len: len }];
/// let view = iovmap::map(&iov)?; // waited for the monitor first (every page was there)
/// assert_eq!(view.stats().monitor_resolved, len);
/// userfaultfd::unregister(uffd.as_fd(), ram, len)?;
/// # drop(view);
/// # unsafe { libc::munmap(ram.cast(), len); libc::close(memfd) };
/// # Ok(()) }
/// ```
///
/// # Errors
/// The kernel's: EINVAL for an unaligned range or modes the userfaultfd was not opened
/// for, EBUSY for a range another userfaultfd owns, and the like. Nothing is recorded then.
pub fn register(uffd: BorrowedFd<'_>, addr: *const u8, len: usize, modes: Modes) -> io::Result<u64> {
    let (start, end) = range_of(addr, len)?;
    if modes.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let before = apply(start, end, modes);
    sys::uffd_register(uffd, start, len, modes.bits()).inspect_err(|_| {
        let mut record = write();
        set(&mut record, start, end, Modes::NONE);
        record.extend(before);
        ANY.store(!record.is_empty(), Ordering::Release);
    })
}

/// Unregisters `[addr, addr + len)` from the userfaultfd `uffd`
/// (`ioctl(uffd, UFFDIO_UNREGISTER)`), then forgets it in the record.
///
/// ```
/// # use std::os::fd::{AsFd, FromRawFd, OwnedFd};
/// # let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | 1) };
/// # if fd < 0 { return }
/// # let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
/// // Before the API handshake the kernel refuses everything: an error, nothing forgotten.
/// assert!(iovmap::userfaultfd::unregister(uffd.as_fd(), 4096 as *const u8, 4096).is_err());
/// ```
///
/// # Errors
/// The kernel's; the record is unchanged then.
pub fn unregister(uffd: BorrowedFd<'_>, addr: *const u8, len: usize) -> io::Result<()> {
    let (start, end) = range_of(addr, len)?;
    sys::uffd_unregister(uffd, start, len)?;
    apply(start, end, Modes::NONE);
    Ok(())
}

/// Records that `[addr, addr + len)` is (about to be) registered with a userfaultfd in
/// `modes`, for a VMM that makes the `UFFDIO_REGISTER` ioctl itself. Call it just before
/// the ioctl, from the thread that makes it, and [`declare_disarmed`] just after
/// `UFFDIO_UNREGISTER`, so that the record always covers what the kernel has armed. A
/// range declared again takes the new modes, as a registration made again does.
///
/// ```
/// use iovmap::userfaultfd::{self, Modes};
/// let page = iovmap::page_size();
/// let ram = vec![0u8; 4 * page]; // any address range: only the record changes
/// let at = ram.as_ptr().wrapping_add(page - ram.as_ptr() as usize % page);
/// userfaultfd::declare_armed(at, 2 * page, Modes::WP);
/// assert_eq!(userfaultfd::armed_modes(at, page), Modes::WP);
/// userfaultfd::declare_disarmed(at, 2 * page);
/// assert_eq!(userfaultfd::armed_modes(at, 2 * page), Modes::NONE);
/// ```
pub fn declare_armed(addr: *const u8, len: usize, modes: Modes) {
    if let Ok((start, end)) = range_of(addr, len) {
        apply(start, end, modes);
    }
}

/// Forgets `[addr, addr + len)` in the record: call it just after `UFFDIO_UNREGISTER`
/// (or when the monitor has placed every page, for MISSING).
///
/// ```
/// iovmap::userfaultfd::declare_disarmed(std::ptr::null(), 4096); // nothing recorded there: no-op
/// ```
pub fn declare_disarmed(addr: *const u8, len: usize) {
    if let Ok((start, end)) = range_of(addr, len) {
        apply(start, end, Modes::NONE);
    }
}

/// The modes the record holds anywhere in `[addr, addr + len)` (their union).
///
/// ```
/// assert!(iovmap::userfaultfd::armed_modes(std::ptr::null(), 4096).is_empty());
/// ```
pub fn armed_modes(addr: *const u8, len: usize) -> Modes {
    let Ok((start, end)) = range_of(addr, len) else { return Modes::NONE };
    let mut modes = Modes::NONE;
    for (_, a) in read().range(..end).rev().take_while(|(_, a)| a.end > start) {
        modes |= a.modes;
    }
    modes
}

/// Has the monitor place or approve every MISSING or MINOR page of `iovs` now, as a map
/// does before it makes a view, for memory the VMM hands on some other way (a udmabuf
/// it makes itself, a DMA mapping, a vhost-user backend): pins and mappings of the file
/// ask no monitor. With [`Access::ReadWrite`](crate::Access::ReadWrite), refuses memory a
/// monitor write-protects as a read-write view would. Returns the bytes faulted in
/// through their (armed) source mappings; 0, with one atomic load, when nothing is armed.
///
/// ```
/// # let page = iovmap::page_size();
/// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), 2 * page, libc::PROT_READ | libc::PROT_WRITE,
/// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) };
/// let iov = [libc::iovec { iov_base: ram, iov_len: 2 * page }];
/// // Nothing armed here: nothing to wait for.
/// assert_eq!(iovmap::userfaultfd::resolve(&iov, iovmap::Access::ReadOnly)?, 0);
/// # unsafe { libc::munmap(ram, 2 * page) };
/// # Ok::<(), iovmap::Error>(())
/// ```
///
/// # Errors
/// [`Error::WriteProtected`] (read-write access over WP memory), or [`Error::Os`] with
/// [`Operation::FaultInArmed`] naming the segment whose pages could not be faulted in.
pub fn resolve(iovs: &[libc::iovec], access: crate::Access) -> Result<usize, Error> {
    guard(iovs, access == crate::Access::ReadWrite)
}

/// The guard of a map: refuses a view that can write (`write`) over write-protected
/// memory, and has the monitor place or approve every MISSING or MINOR page of the list
/// before anything is mapped. Returns the bytes faulted in through the source.
#[inline]
pub(crate) fn guard(iovs: &[libc::iovec], write: bool) -> Result<usize, Error> {
    if !ANY.load(Ordering::Acquire) {
        return Ok(0);
    }
    guard_armed(iovs, write)
}

#[cold]
#[inline(never)]
fn guard_armed(iovs: &[libc::iovec], write: bool) -> Result<usize, Error> {
    let page = sys::page_size();
    // What to fault in: the list's pages in MISSING/MINOR ranges, as (start, end, index
    // of the first segment there), adjacent pieces merged. Made under the read lock,
    // faulted in after it (the monitor may take its time).
    let mut resolve: Vec<(usize, usize, usize)> = Vec::new();
    {
        let record = read();
        for (index, iov) in iovs.iter().enumerate().filter(|(_, iov)| iov.iov_len > 0) {
            // The view maps whole pages: the page boundaries around the segment.
            let start = iov.iov_base as usize & !(page - 1);
            let Some(end) =
                (iov.iov_base as usize).checked_add(iov.iov_len).and_then(|e| e.checked_next_multiple_of(page))
            else {
                continue; // the planner refused it already
            };
            for (&s, a) in record.range(..end).rev().take_while(|(_, a)| a.end > start) {
                if write && a.modes.contains(Modes::WP) {
                    return Err(Error::WriteProtected { index });
                }
                if a.modes.intersects(Modes::MISSING | Modes::MINOR) {
                    let (from, to) = (s.max(start), a.end.min(end));
                    match resolve.last_mut() {
                        Some(last) if last.1 == from => last.1 = to,
                        _ => resolve.push((from, to, index)),
                    }
                }
            }
        }
    }
    // `range(..end).rev()` gives a segment's armed pieces from the highest down; sorting
    // and merging again keeps each byte faulted in once.
    resolve.sort_unstable();
    resolve.dedup_by(|next, prev| {
        if next.0 <= prev.1 {
            prev.1 = prev.1.max(next.1);
            true
        } else {
            false
        }
    });
    let mut bytes = 0;
    for (start, end, index) in resolve {
        sys::fault_in_armed(start, end - start).map_err(|source| Error::Os {
            op: Operation::FaultInArmed,
            index: Some(index),
            source,
        })?;
        bytes += end - start;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(r: &BTreeMap<usize, Armed>) -> Vec<(usize, usize, u64)> {
        r.iter().map(|(&s, a)| (s, a.end, a.modes.bits())).collect()
    }

    #[test]
    fn setting_a_range_splits_what_it_overlaps_and_returns_it() {
        let mut r = BTreeMap::new();
        set(&mut r, 0x1000, 0x5000, Modes::MISSING);
        set(&mut r, 0x6000, 0x8000, Modes::WP);
        let before = set(&mut r, 0x3000, 0x7000, Modes::MINOR);
        assert_eq!(entries(&r), [(0x1000, 0x3000, 1), (0x3000, 0x7000, 4), (0x7000, 0x8000, 2)]);
        let mut before: Vec<_> = before.into_iter().map(|(s, a)| (s, a.end, a.modes.bits())).collect();
        before.sort_unstable();
        assert_eq!(before, [(0x3000, 0x5000, 1), (0x6000, 0x7000, 2)]);
        set(&mut r, 0, 0x10000, Modes::NONE);
        assert!(r.is_empty());
    }

    #[test]
    fn forgetting_the_middle_keeps_both_ends() {
        let mut r = BTreeMap::new();
        set(&mut r, 0x1000, 0x9000, Modes::MISSING | Modes::WP);
        set(&mut r, 0x4000, 0x5000, Modes::NONE);
        assert_eq!(entries(&r), [(0x1000, 0x4000, 3), (0x5000, 0x9000, 3)]);
    }
}
