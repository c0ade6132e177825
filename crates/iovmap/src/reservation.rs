//! The address range a view is built in.
//!
//! A [`Reservation`] is a PROT_NONE private anonymous mapping, aligned to the largest
//! page size of the view's runs (over-reserve, then trim head and tail). Runs are placed
//! inside it with MAP_FIXED / MREMAP_FIXED, so a run that was never placed faults
//! instead of showing stale memory, and dropping the reservation before it becomes a
//! view unmaps everything placed so far: that drop is the rollback of every error path.

use std::io;

use crate::sys;

pub(crate) struct Reservation {
    base: usize,
    len: usize,
}

impl Reservation {
    /// Reserves `len` bytes at an address aligned to `align` (a power of two no smaller
    /// than the base page).
    pub(crate) fn new(len: usize, align: usize) -> io::Result<Self> {
        let page = sys::page_size();
        if align <= page {
            return Ok(Reservation { base: sys::reserve(len)?, len });
        }
        let over = len.checked_add(align - page).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let raw = sys::reserve(over)?;
        // From here on `held` is exactly what is still mapped, so any failure unmaps it.
        let mut held = Reservation { base: raw, len: over };
        let base = raw.next_multiple_of(align);
        let head = base - raw;
        let tail = over - head - len;
        if head > 0 {
            // SAFETY: `[raw, base)` is the head of the range reserved just above.
            unsafe { sys::trim(raw, head)? };
            held = Reservation { base, len: over - head };
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

    /// Hands the range over to a view, which becomes responsible for unmapping it.
    pub(crate) fn into_raw(self) -> (usize, usize) {
        let range = (self.base, self.len);
        std::mem::forget(self);
        range
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: the range was reserved by `new` and everything in it was placed by the
        // map path, which owns it until `into_raw`; nothing outside refers to it.
        if let Err(e) = unsafe { sys::unmap(self.base, self.len) } {
            log::error!("iovmap: munmap of a reservation at {:#x} failed: {e}", self.base);
        }
    }
}
