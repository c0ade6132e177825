//! Fault injection (feature `fault-injection`, for tests only).
//!
//! A [`Faults`] guard arms the calling thread: from then on every syscall of the map path
//! that this thread makes is counted, and the one chosen with [`Faults::fail`] returns the
//! chosen errno instead of reaching the kernel. The real kernel is used for everything
//! else, so a test can prove that a failure at any given step leaves no mapping and no fd
//! behind.
//!
//! `sys.rs` calls `inject` at the top of each wrapper; this module uses nothing of
//! `sys` or `holes` (its own few syscalls, which emulate an older kernel, are made here
//! with libc), so the three do not depend on each other in a circle.
//!
//! ```
//! use iovmap::fault::{Faults, Operation};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let page = iovmap::page_size();
//! let faults = Faults::new().fail(Operation::Reserve, 0, libc::ENOMEM);
//! let shared = unsafe {
//!     libc::mmap(std::ptr::null_mut(), 4 * page, libc::PROT_READ | libc::PROT_WRITE,
//!                libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
//! } as *mut u8;
//! // Two runs: a view of them needs a reservation.
//! let iov = |p: usize| libc::iovec { iov_base: unsafe { shared.add(p * page) }.cast(), iov_len: page };
//! assert!(iovmap::map(&[iov(3), iov(0)]).is_err());
//! assert!(faults.fired());
//! # unsafe { libc::munmap(shared.cast(), 4 * page) };
//! # Ok(()) }
//! ```

use std::cell::RefCell;
use std::io;
use std::ops::Range;

pub use crate::error::Operation;

#[derive(Default)]
struct State {
    calls: [usize; Operation::ALL.len()],
    fail: Option<(Operation, usize, i32)>,
    fired: bool,
    /// Behave as a kernel that does (or does not) punch holes, instead of probing.
    holes: Option<bool>,
    /// Behave as a kernel that lacks MADV_POPULATE_* (Linux before 5.14).
    no_populate_advice: bool,
    /// Injected clone refusals leave their destination mapped (see
    /// [`Faults::refuse_before_unmap`]).
    keep_destination: bool,
    /// Map a foreign mapping into the hole an injected clone failure punches.
    squat: bool,
    /// The foreign mapping made, if any: (address, length).
    squatter: Option<(usize, usize)>,
}

/// The byte a squatter mapping is filled with.
pub const SQUATTER_BYTE: u8 = 0xab;

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
    /// Set while iovmap measures the kernel for itself (`unobserved`): no injection then.
    static UNOBSERVED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with fault injection out of the way on this thread: its syscalls are neither
/// counted nor failed. For iovmap's one-time measurements of the kernel (the hole probe,
/// `holes.rs`), which run on the calling thread whenever it first needs them: a failure
/// meant for the map path must not make them measure wrong, and their syscalls must not
/// shift the count a test chose its failure by.
pub(crate) fn unobserved<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            UNOBSERVED.with(|u| u.set(self.0));
        }
    }
    let _restore = Restore(UNOBSERVED.with(|u| u.replace(true)));
    f()
}

fn slot(op: Operation) -> usize {
    Operation::ALL.iter().position(|s| *s == op).unwrap_or(0)
}

/// The injection point: called by every wrapper in `sys` before it reaches the kernel,
/// with the range of iovmap's own memory the call would change (empty if none). Counts
/// the call, and fails it if it is the one chosen. A chosen clone refusal on a thread
/// that emulates a kernel that punches holes (Linux before 6.17) first unmaps `range`,
/// as that kernel does.
pub(crate) fn inject(op: Operation, range: Range<usize>) -> io::Result<()> {
    if UNOBSERVED.with(std::cell::Cell::get) {
        return Ok(());
    }
    let failed = STATE.with(|s| {
        let mut s = s.borrow_mut();
        let state = s.as_mut()?;
        let n = state.calls[slot(op)];
        state.calls[slot(op)] += 1;
        match state.fail {
            Some((target, nth, errno)) if target == op && nth == n => {
                state.fired = true;
                Some(errno)
            }
            _ => None,
        }
    });
    let Some(errno) = failed else { return Ok(()) };
    if op == Operation::Clone && matches!(errno, libc::EFAULT | libc::EINVAL | libc::EPERM) && emulating_holes() {
        punch(range);
    }
    Err(io::Error::from_raw_os_error(errno))
}

/// The kernel behaviour this thread assumes, if a [`Faults`] guard set one.
pub(crate) fn assumed_holes() -> Option<bool> {
    STATE.with(|s| s.borrow().as_ref().and_then(|st| st.holes))
}

/// Whether this thread emulates a kernel without MADV_POPULATE_* (Linux before 5.14).
pub(crate) fn emulating_no_populate_advice() -> bool {
    STATE.with(|s| s.borrow().as_ref().is_some_and(|st| st.no_populate_advice))
}

/// Whether injected clone refusals punch a hole, as Linux before 6.17 does.
fn emulating_holes() -> bool {
    assumed_holes() == Some(true) && !STATE.with(|s| s.borrow().as_ref().is_some_and(|st| st.keep_destination))
}

/// Does what Linux before 6.17 does to the destination of a refused clone: unmaps it.
/// Then, if asked, maps a foreign mapping there, as another thread's mmap could.
fn punch(range: Range<usize>) {
    let (dst, len) = (range.start, range.len());
    // SAFETY: `range` is the destination of the clone being failed: part of a reservation
    // the map path owns (the contract of `sys::clone_fixed`), which the emulated kernel
    // unmaps; the map path then treats it as a hole it no longer owns.
    unsafe { libc::munmap(dst as *mut libc::c_void, len) };
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let Some(st) = s.as_mut().filter(|st| st.squat && st.squatter.is_none()) else { return };
        // SAFETY: MAP_FIXED_NOREPLACE only fills a free range (the hole just punched).
        let p = unsafe {
            libc::mmap(
                dst as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p as usize == dst {
            // SAFETY: the mapping just made, `len` bytes, writable.
            unsafe { std::ptr::write_bytes(p.cast::<u8>(), SQUATTER_BYTE, len) };
            st.squatter = Some((dst, len));
        }
    })
}

/// Arms fault injection on the calling thread until dropped.
#[must_use = "fault injection is disarmed when the guard is dropped"]
pub struct Faults {
    // Not Send: the state is the calling thread's.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Faults {
    /// Starts counting this thread's syscalls; nothing fails yet.
    ///
    /// ```
    /// use iovmap::fault::{Faults, Operation};
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) };
    /// # let iov = [libc::iovec { iov_base: ram, iov_len: page }];
    /// let faults = Faults::new().assume_holes(false);
    /// drop(iovmap::map(&iov)?);
    /// // One run: one clone where the kernel chooses, no reservation.
    /// assert_eq!((faults.calls(Operation::Reserve), faults.calls(Operation::Clone)), (0, 1));
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    pub fn new() -> Self {
        // The one-time measurement of the kernel (holes.rs) runs `unobserved`, so it
        // never meets a failure meant for the map path.
        STATE.with(|s| *s.borrow_mut() = Some(State::default()));
        Faults { _thread: std::marker::PhantomData }
    }

    /// Makes the `nth` (0-based, counted from now) call of `op` fail with `errno`.
    ///
    /// ```
    /// use iovmap::fault::{Faults, Operation};
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) };
    /// # let iov = [libc::iovec { iov_base: ram, iov_len: page }];
    /// let faults = Faults::new().fail(Operation::Clone, 0, libc::EIO);
    /// assert!(iovmap::map(&iov).is_err());
    /// ```
    pub fn fail(self, op: Operation, nth: usize, errno: i32) -> Self {
        STATE.with(|s| {
            if let Some(state) = s.borrow_mut().as_mut() {
                state.calls = Default::default();
                state.fail = Some((op, nth, errno));
                state.fired = false;
            }
        });
        self
    }

    /// How many times `op` was attempted since the guard was armed (or since
    /// [`Faults::fail`]), the failed attempt included.
    ///
    /// ```
    /// # use iovmap::fault::{Faults, Operation};
    /// let faults = Faults::new();
    /// assert_eq!(faults.calls(Operation::Populate), 0);
    /// ```
    pub fn calls(&self, op: Operation) -> usize {
        STATE.with(|s| s.borrow().as_ref().map_or(0, |st| st.calls[slot(op)]))
    }

    /// Makes this thread's map path behave as on a kernel that does (`true`) or does not
    /// (`false`) punch a hole at the destination of a refused clone, instead of probing
    /// the kernel; with `true`, an injected clone refusal (EFAULT or EINVAL) really unmaps
    /// the destination, as Linux before 6.17 does.
    ///
    /// ```
    /// # use iovmap::fault::Faults;
    /// let faults = Faults::new().assume_holes(true);
    /// # drop(faults);
    /// ```
    pub fn assume_holes(self, punches: bool) -> Self {
        STATE.with(|s| {
            if let Some(st) = s.borrow_mut().as_mut() {
                st.holes = Some(punches);
            }
        });
        self
    }

    /// Behave as a kernel that lacks MADV_POPULATE_READ/WRITE: every madvise with them
    /// returns EINVAL without reaching the kernel, as Linux before 5.14 does, so that
    /// `populate` prefaults by reads.
    ///
    /// ```
    /// use iovmap::fault::{Faults, Operation};
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), 2 * page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) };
    /// # let iov = [libc::iovec { iov_base: ram, iov_len: 2 * page }];
    /// let faults = Faults::new().without_populate_advice();
    /// drop(iovmap::Remapper::new().map_with(&iov, iovmap::MapOptions::new().populate())?);
    /// // The refused madvise, then the reads that prefault instead.
    /// assert_eq!(faults.calls(Operation::Populate), 2);
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    pub fn without_populate_advice(self) -> Self {
        STATE.with(|s| {
            if let Some(st) = s.borrow_mut().as_mut() {
                st.no_populate_advice = true;
            }
        });
        self
    }

    /// With [`Faults::assume_holes`]`(true)`: the injected clone refusal leaves its
    /// destination mapped, as Linux before 6.17 does when nothing is mapped at the source
    /// (that EFAULT comes from a lookup before the unmap; refusals for the source's kind
    /// come after it).
    ///
    /// ```
    /// # use iovmap::fault::{Faults, Operation};
    /// let faults = Faults::new().assume_holes(true).refuse_before_unmap().fail(Operation::Clone, 0, libc::EFAULT);
    /// # drop(faults);
    /// ```
    pub fn refuse_before_unmap(self) -> Self {
        STATE.with(|s| {
            if let Some(st) = s.borrow_mut().as_mut() {
                st.keep_destination = true;
            }
        });
        self
    }

    /// With [`Faults::assume_holes`]`(true)`: as soon as an injected clone failure has
    /// punched its hole, fill it with a foreign mapping (private anonymous, every byte
    /// [`SQUATTER_BYTE`]), as another thread's mmap could. The test owns it afterwards:
    /// see [`Faults::squatter`].
    ///
    /// ```
    /// # use iovmap::fault::Faults;
    /// let faults = Faults::new().assume_holes(true).squat_in_holes();
    /// assert_eq!(faults.squatter(), None);
    /// ```
    pub fn squat_in_holes(self) -> Self {
        STATE.with(|s| {
            if let Some(st) = s.borrow_mut().as_mut() {
                st.squat = true;
            }
        });
        self
    }

    /// The foreign mapping [`Faults::squat_in_holes`] made, as (address, length); the
    /// caller unmaps it.
    ///
    /// ```
    /// # use iovmap::fault::Faults;
    /// assert_eq!(Faults::new().squatter(), None);
    /// ```
    pub fn squatter(&self) -> Option<(usize, usize)> {
        STATE.with(|s| s.borrow().as_ref().and_then(|st| st.squatter))
    }

    /// Whether the chosen failure has been injected.
    ///
    /// ```
    /// # use iovmap::fault::{Faults, Operation};
    /// let faults = Faults::new().fail(Operation::Protect, 0, libc::EIO);
    /// assert!(!faults.fired()); // nothing has been mapped yet
    /// ```
    pub fn fired(&self) -> bool {
        STATE.with(|s| s.borrow().as_ref().is_some_and(|st| st.fired))
    }
}

impl Default for Faults {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Faults {
    fn drop(&mut self) {
        STATE.with(|s| *s.borrow_mut() = None);
    }
}
