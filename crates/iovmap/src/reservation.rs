//! The address range a view is built in.
//!
//! A [`Reservation`] is a PROT_NONE private mapping, aligned to the largest page size of
//! the view's runs (over-reserve, then trim head and tail). Runs are placed inside it with
//! MAP_FIXED / MREMAP_FIXED, so a run that was never placed faults instead of showing
//! stale memory, and dropping the reservation before it becomes a view unmaps everything
//! placed so far: that drop is the rollback of every error path.
//!
//! On kernels that punch holes (see `holes.rs`), a clone refused into the reservation may
//! or may not have unmapped its destination: Linux before 6.17 unmaps it before checking
//! the source's kind (VM_PFNMAP, private memory), but not when the source is not mapped
//! at all (that EFAULT comes from a lookup before the unmap). Another thread may have
//! mapped something into a hole since, so the two cases must be told apart for certain,
//! and an anonymous PROT_NONE range looks like any other. There a reservation is
//! therefore *marked*: a private PROT_NONE mapping of iovmap's own memfd at an offset no
//! other reservation uses, so the VMA at an address says whether it is still this
//! reservation ([`Reservation::still_holds`]). A range it no longer holds is recorded as
//! a hole, and the rollback unmaps everything but the holes.
//!
//! Every placement goes through [`Reservation::slot`], which checks (in release builds
//! too: one compare per syscall) that the range lies inside the reservation: that check
//! is what the `// SAFETY:` arguments of `MAP_FIXED` and `MREMAP_FIXED` in `place.rs`
//! rest on.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Operation};
use crate::regions::FileId;
use crate::{sys, vma};

pub(crate) struct Reservation {
    base: NonNull<u8>,
    len: usize,
    /// For a marked reservation: the offset in the marker file of `base`.
    marker: Option<u64>,
    /// Ranges `(start, end)` that may no longer be ours.
    holes: Vec<(usize, usize)>,
}

/// The memfd marked reservations map, opened once per process and kept open (marked
/// reservations are made only on kernels that punch holes).
struct MarkerFile {
    fd: OwnedFd,
    id: FileId,
    /// The next unused offset: every reservation takes its own stretch of the file.
    next: AtomicU64,
}

static MARKER: OnceLock<MarkerFile> = OnceLock::new();

/// Offsets wrap here (far below the 2^63 limit of a file offset); a reservation would
/// have to live while 2^62 bytes of others are made for two to share an offset.
const MARKER_SPACE: u64 = 1 << 62;

fn marker_file() -> io::Result<&'static MarkerFile> {
    if let Some(m) = MARKER.get() {
        return Ok(m);
    }
    let fd = sys::memfd(c"iovmap-reservation")?;
    let info = sys::file_info(fd.as_fd())?;
    let id = FileId::from_stat(info.dev, info.ino);
    // A thread that lost the race drops its memfd.
    let _ = MARKER.set(MarkerFile { fd, id, next: AtomicU64::new(0) });
    Ok(MARKER.get().expect("just set"))
}

/// Maps `len` bytes of address space: anonymous, or, if `marked`, from a fresh stretch of
/// the marker file. Returns the address and the marker offset.
fn reserve(len: usize, marked: bool) -> io::Result<(NonNull<u8>, Option<u64>)> {
    if !marked {
        return Ok((sys::reserve(len, None)?, None));
    }
    let m = marker_file()?;
    let offset = m.next.fetch_add(len as u64, Ordering::Relaxed) % MARKER_SPACE;
    Ok((sys::reserve(len, Some((m.fd.as_fd(), offset)))?, Some(offset)))
}

impl Reservation {
    /// Reserves `len` bytes at an address aligned to `align` (a power of two no smaller
    /// than the base page); `marked` on kernels that punch holes (see the module docs).
    pub(crate) fn new(len: usize, align: usize, marked: bool) -> Result<Self, Error> {
        let os = |op: Operation| move |source: io::Error| Error::Os { op, index: None, source };
        let page = sys::page_size();
        if align <= page {
            let (base, marker) = reserve(len, marked).map_err(os(Operation::Reserve))?;
            return Ok(Reservation { base, len, marker, holes: Vec::new() });
        }
        let over = len.checked_add(align - page).ok_or(Error::TooLarge)?;
        let (raw, marker) = reserve(over, marked).map_err(os(Operation::Reserve))?;
        // From here on `held` is exactly what is still mapped, so any failure unmaps it.
        let mut held = Reservation { base: raw, len: over, marker, holes: Vec::new() };
        let head = (raw.as_ptr() as usize).next_multiple_of(align) - raw.as_ptr() as usize;
        let tail = over - head - len;
        if head > 0 {
            // SAFETY: `[raw, raw + head)` is the head of the range reserved just above.
            unsafe { sys::trim(raw, head) }.map_err(os(Operation::Trim))?;
            // SAFETY: `head < over`: the aligned base lies inside the reservation.
            held.base = unsafe { raw.add(head) };
            held.len = over - head;
            held.marker = marker.map(|m| m + head as u64);
        }
        if tail > 0 {
            // SAFETY: `[base + len, base + len + tail)` is the tail of the same
            // reservation (`held.len == len + tail` here).
            unsafe { sys::trim(held.base.add(len), tail) }.map_err(os(Operation::Trim))?;
            held.len = len;
        }
        Ok(held)
    }

    /// No range yet: what a one-run view starts from, before its one placement made
    /// where the kernel chose is [adopted](Reservation::adopt). Dropping it unmaps nothing.
    pub(crate) fn empty() -> Self {
        Reservation { base: NonNull::dangling(), len: 0, marker: None, holes: Vec::new() }
    }

    /// Takes over `[base, base + len)`, a mapping the map path just made where the kernel
    /// chose (a one-run view placed without a reservation): from now on it is this
    /// reservation's to hand to a view or to unmap on error.
    pub(crate) fn adopt(base: NonNull<u8>, len: usize) -> Self {
        Reservation { base, len, marker: None, holes: Vec::new() }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The address of `[offset, offset + len)` of the reservation, if that range lies in
    /// it (checked in every build).
    #[inline]
    pub(crate) fn slot(&self, offset: usize, len: usize) -> Option<NonNull<u8>> {
        if offset.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: `offset <= self.len`: the result lies in (or one past) the reservation.
        Some(unsafe { self.base.add(offset) })
    }

    /// The whole reservation.
    pub(crate) fn whole(&self) -> NonNull<u8> {
        self.base
    }

    /// Records that `[start, start + len)` may have been unmapped by the kernel.
    pub(crate) fn mark_hole(&mut self, start: NonNull<u8>, len: usize) {
        let start = start.as_ptr() as usize;
        self.holes.push((start, start + len));
    }

    /// Whether `start` begins a recorded hole.
    pub(crate) fn is_hole(&self, start: NonNull<u8>) -> bool {
        self.holes.iter().any(|h| h.0 == start.as_ptr() as usize)
    }

    /// Records that the hole at `start` is ours again (filled without replacing anything,
    /// or found never to have been punched).
    pub(crate) fn fill_hole(&mut self, start: NonNull<u8>) {
        self.holes.retain(|h| h.0 != start.as_ptr() as usize);
    }

    /// Whether this reservation still maps `addr` (never placed there, nor unmapped
    /// since): the kernel's VMA at `addr` maps the marker file at this reservation's
    /// offset for `addr`. Only a marked reservation can tell; an unmarked one answers
    /// `false`. A range the kernel unmaps goes whole, so one address stands for the range
    /// starting there.
    pub(crate) fn still_holds(&self, addr: NonNull<u8>) -> io::Result<bool> {
        let (Some(marker), Some(m)) = (self.marker, MARKER.get()) else { return Ok(false) };
        let addr = addr.as_ptr() as usize;
        let want = marker + (addr - self.base.as_ptr() as usize) as u64;
        let seen = vma::vmas_now(&[addr])?.pop().flatten();
        Ok(seen.is_some_and(|v| !v.shared && v.file == m.id && v.offset + (addr - v.start) as u64 == want))
    }

    /// Hands the range over to a view, which becomes responsible for unmapping all of it.
    ///
    /// # Panics
    /// If a hole is still recorded: the view would unmap a range that may be another
    /// thread's mapping. The map path fills or fails on every hole before this, so this
    /// is a bug check, made in every build because the view's drop relies on it.
    pub(crate) fn into_raw(self) -> (NonNull<u8>, usize) {
        assert!(self.holes.is_empty(), "iovmap bug: a view would own a range another thread may have mapped");
        let range = (self.base, self.len);
        std::mem::forget(self);
        range
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.holes.sort_unstable();
        let base = self.base.as_ptr() as usize;
        let mut from = base;
        let end = base + self.len;
        for &(hole_start, hole_end) in self.holes.iter().chain([(end, end)].iter()) {
            if hole_start > from {
                let Some(at) = self.slot(from - base, hole_start - from) else { continue };
                // SAFETY: `[from, hole_start)` lies in the reservation (`slot` checked) and
                // outside every hole: it holds only the reservation and runs placed by the
                // map path, which owns them until `into_raw`; nothing outside refers to them.
                if let Err(e) = unsafe { sys::unmap(at, hole_start - from) } {
                    log::error!("iovmap: munmap of a reservation at {from:#x} failed: {e}");
                }
            }
            from = from.max(hole_end);
        }
    }
}
