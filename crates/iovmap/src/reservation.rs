//! The address range a view is built in.
//!
//! A [`Reservation`] is a PROT_NONE private anonymous mapping, aligned to the largest
//! page size of the view's runs (over-reserve, then trim head and tail). Runs are placed
//! inside it with MAP_FIXED / MREMAP_FIXED, so a run that was never placed faults
//! instead of showing stale memory, and dropping the reservation before it becomes a
//! view unmaps everything placed so far: that drop is the rollback of every error path.
//!
//! On kernels that punch holes (see `holes.rs`), a range whose clone failed may have been
//! unmapped by the kernel and taken by another thread since. Such a range is recorded as
//! a hole and the rollback unmaps everything but the holes.

use std::io;

use crate::sys;

pub(crate) struct Reservation {
    base: usize,
    len: usize,
    /// Ranges `(start, end)` that may no longer be ours.
    holes: Vec<(usize, usize)>,
}

impl Reservation {
    /// Reserves `len` bytes at an address aligned to `align` (a power of two no smaller
    /// than the base page).
    pub(crate) fn new(len: usize, align: usize) -> io::Result<Self> {
        let page = sys::page_size();
        if align <= page {
            return Ok(Reservation { base: sys::reserve(len)?, len, holes: Vec::new() });
        }
        let over = len.checked_add(align - page).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let raw = sys::reserve(over)?;
        // From here on `held` is exactly what is still mapped, so any failure unmaps it.
        let mut held = Reservation { base: raw, len: over, holes: Vec::new() };
        let base = raw.next_multiple_of(align);
        let head = base - raw;
        let tail = over - head - len;
        if head > 0 {
            // SAFETY: `[raw, base)` is the head of the range reserved just above.
            unsafe { sys::trim(raw, head)? };
            held.base = base;
            held.len = over - head;
        }
        if tail > 0 {
            // SAFETY: `[base + len, raw + over)` is the tail of the same reservation.
            unsafe { sys::trim(base + len, tail)? };
            held.len = len;
        }
        Ok(held)
    }

    pub(crate) fn base(&self) -> usize {
        self.base
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Records that `[start, start + len)` may have been unmapped by the kernel.
    pub(crate) fn mark_hole(&mut self, start: usize, len: usize) {
        self.holes.push((start, start + len));
    }

    /// Whether `start` begins a recorded hole.
    pub(crate) fn is_hole(&self, start: usize) -> bool {
        self.holes.iter().any(|h| h.0 == start)
    }

    /// Records that the hole at `start` is ours again (filled without replacing anything).
    pub(crate) fn fill_hole(&mut self, start: usize) {
        self.holes.retain(|h| h.0 != start);
    }

    /// Hands the range over to a view, which becomes responsible for unmapping it.
    pub(crate) fn into_raw(self) -> (usize, usize) {
        debug_assert!(self.holes.is_empty(), "a view with holes");
        let range = (self.base, self.len);
        std::mem::forget(self);
        range
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.holes.sort_unstable();
        let mut from = self.base;
        let end = self.base + self.len;
        for &(hole_start, hole_end) in self.holes.iter().chain([(end, end)].iter()) {
            if hole_start > from {
                // SAFETY: `[from, hole_start)` lies in the reservation and outside every
                // hole: it holds only the reservation and runs placed by the map path,
                // which owns them until `into_raw`; nothing outside refers to them.
                if let Err(e) = unsafe { sys::unmap(from, hole_start - from) } {
                    log::error!("iovmap: munmap of a reservation at {from:#x} failed: {e}");
                }
            }
            from = from.max(hole_end);
        }
    }
}
