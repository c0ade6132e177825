//! Fault injection (feature `fault-injection`, for tests only).
//!
//! A [`Faults`] guard arms the calling thread: from then on every syscall of the map path
//! that this thread makes is counted, and the one chosen with [`Faults::fail`] returns the
//! chosen errno instead of reaching the kernel. The real kernel is used for everything
//! else, so a test can prove that a failure at any given step leaves no mapping and no fd
//! behind.
//!
//! ```
//! use iovmap::fault::{Faults, Syscall};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let page = vec![0u8; 1]; // any address: the reservation fails before it is looked at
//! # let _ = page;
//! let faults = Faults::new().fail(Syscall::Reserve, 0, libc::ENOMEM);
//! let shared = unsafe {
//!     libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE,
//!                libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
//! };
//! let iov = [libc::iovec { iov_base: shared, iov_len: 4096 }];
//! assert!(iovmap::map(&iov).is_err());
//! assert!(faults.fired());
//! # unsafe { libc::munmap(shared, 4096) };
//! # Ok(()) }
//! ```

use std::cell::RefCell;
use std::io;

pub use crate::sys::Syscall;

#[derive(Default)]
struct State {
    calls: [usize; Syscall::ALL.len()],
    fail: Option<(Syscall, usize, i32)>,
    fired: bool,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fn slot(syscall: Syscall) -> usize {
    Syscall::ALL.iter().position(|s| *s == syscall).unwrap_or(0)
}

/// Called by every wrapper in `sys` before it reaches the kernel.
pub(crate) fn check(syscall: Syscall) -> io::Result<()> {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let Some(state) = s.as_mut() else { return Ok(()) };
        let n = state.calls[slot(syscall)];
        state.calls[slot(syscall)] += 1;
        match state.fail {
            Some((target, nth, errno)) if target == syscall && nth == n => {
                state.fired = true;
                Err(io::Error::from_raw_os_error(errno))
            }
            _ => Ok(()),
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
    /// use iovmap::fault::{Faults, Syscall};
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) };
    /// # let iov = [libc::iovec { iov_base: ram, iov_len: page }];
    /// let faults = Faults::new();
    /// drop(iovmap::map(&iov)?);
    /// assert_eq!((faults.calls(Syscall::Reserve), faults.calls(Syscall::Clone)), (1, 1));
    /// # Ok::<(), iovmap::Error>(())
    /// ```
    pub fn new() -> Self {
        STATE.with(|s| *s.borrow_mut() = Some(State::default()));
        Faults { _thread: std::marker::PhantomData }
    }

    /// Makes the `nth` (0-based, counted from now) call of `syscall` fail with `errno`.
    ///
    /// ```
    /// use iovmap::fault::{Faults, Syscall};
    /// # let page = iovmap::page_size();
    /// # let ram = unsafe { libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ | libc::PROT_WRITE,
    /// #     libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0) };
    /// # let iov = [libc::iovec { iov_base: ram, iov_len: page }];
    /// let faults = Faults::new().fail(Syscall::Clone, 0, libc::EIO);
    /// assert!(iovmap::map(&iov).is_err());
    /// ```
    pub fn fail(self, syscall: Syscall, nth: usize, errno: i32) -> Self {
        STATE.with(|s| {
            if let Some(state) = s.borrow_mut().as_mut() {
                state.calls = Default::default();
                state.fail = Some((syscall, nth, errno));
                state.fired = false;
            }
        });
        self
    }

    /// How many times `syscall` was attempted since the guard was armed (or since
    /// [`Faults::fail`]), the failed attempt included.
    ///
    /// ```
    /// # use iovmap::fault::{Faults, Syscall};
    /// let faults = Faults::new();
    /// assert_eq!(faults.calls(Syscall::Populate), 0);
    /// ```
    pub fn calls(&self, syscall: Syscall) -> usize {
        STATE.with(|s| s.borrow().as_ref().map_or(0, |st| st.calls[slot(syscall)]))
    }

    /// Whether the chosen failure has been injected.
    ///
    /// ```
    /// # use iovmap::fault::{Faults, Syscall};
    /// let faults = Faults::new().fail(Syscall::Protect, 0, libc::EIO);
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
