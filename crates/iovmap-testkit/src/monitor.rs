//! A userfaultfd monitor that plays the VMM: a real userfaultfd, and a thread that
//! serves its faults as QEMU does (MISSING: places the page with `UFFDIO_COPY`, as the
//! postcopy destination does with pages from the source; MINOR: restores the page through
//! an alias of its own, then approves it with `UFFDIO_CONTINUE`; WP: records the page's
//! old bytes, as a live snapshot saves them, and lifts the protection of that page).
//!
//! The monitor's pages are the fixture pattern with seed [`Monitor::SEED`]: a byte seen
//! through a view is the monitor's exactly when it is `pattern(SEED, offset)`.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::Unavailable;

/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
/// `_IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;
/// `_IOWR(0xAA, 0x07, struct uffdio_continue)`.
const UFFDIO_CONTINUE: libc::c_ulong = 0xC020_AA07;

/// `UFFD_FEATURE_MISSING_HUGETLBFS`.
pub const FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// `UFFD_FEATURE_MISSING_SHMEM` (Linux 4.11).
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_MINOR_SHMEM` (Linux 5.14).
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (Linux 6.1).
pub const FEATURE_WP_SHMEM: u64 = 1 << 12;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;
const WRITEPROTECT_MODE_WP: u64 = 1;

/// The modes of a registration (`UFFDIO_REGISTER_MODE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Postcopy migration: pages not yet received.
    Missing,
    /// Snapshot restore from shmem: pages the monitor must approve.
    Minor,
    /// Live snapshot: writes the monitor must see first.
    Wp,
}

impl Mode {
    /// The `UFFDIO_REGISTER_MODE_*` bit.
    pub fn bits(self) -> u64 {
        match self {
            Mode::Missing => 1,
            Mode::Wp => 2,
            Mode::Minor => 4,
        }
    }

    /// The feature the kernel needs for this mode on shmem (memfd) memory.
    pub fn shmem_feature(self) -> u64 {
        match self {
            Mode::Missing => FEATURE_MISSING_SHMEM,
            Mode::Minor => FEATURE_MINOR_SHMEM,
            Mode::Wp => FEATURE_WP_SHMEM,
        }
    }
}

fn ioctl<T>(fd: BorrowedFd<'_>, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the struct the request number encodes, initialised; the
    // kernel reads it and writes only its output fields.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens a userfaultfd (close-on-exec, non-blocking) and makes the API handshake with
/// `features`.
fn open_with(features: u64) -> io::Result<(OwnedFd, u64)> {
    // SAFETY: the userfaultfd syscall takes flags only; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = [UFFD_API, features, 0u64];
    ioctl(fd.as_fd(), UFFDIO_API, &mut api)?;
    Ok((fd, api[1]))
}

/// The features this kernel's userfaultfd offers, or why there is none to use.
pub fn features() -> Result<u64, Unavailable> {
    open_with(0).map(|(_, f)| f).map_err(|e| {
        Unavailable(format!("no userfaultfd here ({e}; as a non-root user, vm.unprivileged_userfaultfd must be 1)"))
    })
}

/// A userfaultfd that can serve `mode` on memfd memory (plus `extra` features), or why
/// this kernel cannot.
pub fn open(mode: Mode, extra: u64) -> Result<OwnedFd, Unavailable> {
    let want = mode.shmem_feature() | extra;
    let have = features()?;
    if have & want != want {
        return Err(Unavailable(format!(
            "this kernel's userfaultfd lacks feature bits {:#x} for {mode:?} on shmem (has {have:#x}; MINOR on \
             shmem needs 5.14, WP on shmem 6.1)",
            want & !have
        )));
    }
    open_with(want).map(|(fd, _)| fd).map_err(|e| Unavailable(format!("UFFDIO_API with {want:#x}: {e}")))
}

/// Places `src` (one page or huge page) at `dst` with `UFFDIO_COPY`, waking the faulter.
pub fn copy(uffd: BorrowedFd<'_>, dst: usize, src: &[u8]) -> io::Result<()> {
    let mut c = [dst as u64, src.as_ptr() as u64, src.len() as u64, 0u64, 0u64];
    ioctl(uffd, UFFDIO_COPY, &mut c)
}

/// Write-protects (`protect`) or unprotects `[start, start + len)` with
/// `UFFDIO_WRITEPROTECT`; unprotecting wakes the faulters.
pub fn writeprotect(uffd: BorrowedFd<'_>, start: usize, len: usize, protect: bool) -> io::Result<()> {
    let mut w = [start as u64, len as u64, if protect { WRITEPROTECT_MODE_WP } else { 0 }];
    ioctl(uffd, UFFDIO_WRITEPROTECT, &mut w)
}

/// Maps the page-cache page at `start` (a minor fault) with `UFFDIO_CONTINUE`.
fn continue_minor(uffd: BorrowedFd<'_>, start: usize, len: usize) -> io::Result<()> {
    let mut c = [start as u64, len as u64, 0u64, 0u64];
    ioctl(uffd, UFFDIO_CONTINUE, &mut c)
}

/// What the monitor saw and did.
#[derive(Debug, Default, Clone)]
pub struct Log {
    /// Offsets (in the registered range) of the pages faulted on, in order.
    pub faults: Vec<usize>,
    /// Offsets of the pages the monitor placed (MISSING) or approved (MINOR).
    pub resolved: BTreeSet<usize>,
    /// Offsets and old bytes of the pages a write reached while protected (WP).
    pub saved: Vec<(usize, Vec<u8>)>,
    /// Failures of the monitor's own ioctls (none in a correct run).
    pub errors: Vec<String>,
}

/// A monitor thread serving one registered range.
pub struct Monitor {
    uffd: Arc<OwnedFd>,
    mode: Mode,
    /// The monitor's own mapping of the file, for MINOR (0 otherwise).
    alias: usize,
    base: usize,
    len: usize,
    unit: usize,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    /// The seed of the pattern the monitor's pages hold.
    pub const SEED: u64 = 0x0bad_cafe;

    /// Starts serving `uffd`, whose range `[base, base + len)` (faults come in units of
    /// `unit` bytes: the page size of its mapping) maps `file` from offset 0. For MINOR,
    /// the monitor restores each page through its own mapping of `file` before it
    /// approves it; for MISSING it places pattern pages; for WP it saves the old bytes.
    pub fn start(uffd: OwnedFd, mode: Mode, base: usize, len: usize, unit: usize, file: BorrowedFd<'_>) -> Self {
        let alias = match mode {
            // SAFETY: a new shared mapping of the file, chosen by the kernel; the monitor
            // owns it and unmaps it when it drops.
            Mode::Minor => unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED, "the monitor's alias: {}", io::Error::last_os_error());
                p as usize
            },
            _ => 0,
        };
        let uffd = Arc::new(uffd);
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Log::default()));
        let (u, s, l) = (uffd.clone(), stop.clone(), log.clone());
        let thread = std::thread::Builder::new()
            .name("uffd-monitor".into())
            .spawn(move || serve(&u, mode, base, unit, alias, &s, &l))
            .expect("the monitor thread");
        Monitor { uffd, mode, alias, base, len, unit, stop, log, thread: Some(thread) }
    }

    /// Records that the pages of `[from, to)` (offsets in the range) were placed before the
    /// monitor started: the pages a postcopy destination received before the switch.
    pub fn received(&self, from: usize, to: usize) {
        self.log.lock().unwrap().resolved.extend((from..to).step_by(self.unit));
    }

    /// The userfaultfd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }

    /// What the monitor has seen and done so far.
    pub fn log(&self) -> Log {
        self.log.lock().unwrap().clone()
    }

    /// Resolves every page of the range the monitor has not resolved yet, as a postcopy
    /// destination places the pages that arrive in the background (MISSING: `UFFDIO_COPY`)
    /// or a restore approves the rest (MINOR: `UFFDIO_CONTINUE`); returns the offsets of
    /// the pages the kernel refused with EEXIST (a page some view made present behind the
    /// monitor's back). Nothing to do for WP.
    pub fn place_the_rest(&self) -> Vec<usize> {
        let mut refused = Vec::new();
        let mut unit = vec![0u8; self.unit];
        let mut at = 0;
        while at < self.len && self.mode != Mode::Wp {
            if !self.log.lock().unwrap().resolved.contains(&at) {
                let done = if self.mode == Mode::Missing {
                    crate::fill_slice(&mut unit, Self::SEED, at);
                    copy(self.fd(), self.base + at, &unit)
                } else {
                    // SAFETY: in the monitor's own mapping of the file (`len` bytes).
                    unsafe { crate::fill((self.alias + at) as *mut u8, self.unit, Self::SEED, at) };
                    continue_minor(self.fd(), self.base + at, self.unit)
                };
                match done {
                    Ok(()) => {
                        self.log.lock().unwrap().resolved.insert(at);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => refused.push(at),
                    Err(e) => panic!("resolving +{at:#x} ({:?}): {e}", self.mode),
                }
            }
            at += self.unit;
        }
        refused
    }

    /// Stops the thread and returns its log (the userfaultfd is closed when the monitor
    /// drops).
    pub fn stop(mut self) -> Log {
        self.halt();
        self.log()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().expect("the monitor thread panicked");
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.halt();
        if self.alias != 0 {
            // SAFETY: the alias made in `start`, used by nothing now that the thread ended.
            unsafe { libc::munmap(self.alias as *mut libc::c_void, self.len) };
        }
    }
}

fn serve(uffd: &OwnedFd, mode: Mode, base: usize, unit: usize, alias: usize, stop: &AtomicBool, log: &Mutex<Log>) {
    let mut msg = [0u8; 32];
    let mut buf = vec![0u8; unit];
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd { fd: uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 20) } <= 0 {
            continue;
        }
        // SAFETY: reads one struct uffd_msg (32 bytes) into `msg`.
        let n = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if n != msg.len() as isize || msg[0] != UFFD_EVENT_PAGEFAULT {
            continue;
        }
        let flags = u64::from_ne_bytes(msg[8..16].try_into().unwrap());
        let address = u64::from_ne_bytes(msg[16..24].try_into().unwrap()) as usize;
        let at = (address - base) & !(unit - 1);
        let start = base + at;
        let mut l = log.lock().unwrap();
        l.faults.push(at);
        let done = match mode {
            Mode::Missing => {
                crate::fill_slice(&mut buf, Monitor::SEED, at);
                copy(uffd.as_fd(), start, &buf).map(|()| {
                    l.resolved.insert(at);
                })
            }
            Mode::Minor if flags & PAGEFAULT_FLAG_MINOR != 0 => {
                // SAFETY: `[alias + at, + unit)` lies in the monitor's own mapping of the
                // file (made in `start`, `len` bytes), which nothing else writes.
                unsafe { crate::fill((alias + at) as *mut u8, unit, Monitor::SEED, at) };
                continue_minor(uffd.as_fd(), start, unit).map(|()| {
                    l.resolved.insert(at);
                })
            }
            Mode::Wp if flags & PAGEFAULT_FLAG_WP != 0 => {
                // SAFETY: the page is mapped (it is write-protected, so present) and the
                // writer waits until the protection is lifted below.
                let old = unsafe { std::slice::from_raw_parts(start as *const u8, unit) }.to_vec();
                l.saved.push((at, old));
                writeprotect(uffd.as_fd(), start, unit, false)
            }
            _ => Ok(()),
        };
        if let Err(e) = done {
            l.errors.push(format!("{mode:?} fault at +{at:#x} (flags {flags:#x}): {e}"));
        }
    }
}

/// Registers `[start, start + len)` with `uffd` in `mode` by the raw ioctl, behind
/// iovmap's back (what a VMM that forgot to tell iovmap does).
pub fn register_raw(uffd: BorrowedFd<'_>, start: usize, len: usize, mode: Mode) -> io::Result<()> {
    let mut r = [start as u64, len as u64, mode.bits(), 0u64];
    ioctl(uffd, 0xC020_AA00, &mut r)
}

/// Aborts the process if it is still alive `secs` seconds from now (a test that waits
/// for a monitor must not hang CI): dropping the watchdog disarms it.
pub struct Watchdog(Option<std::sync::mpsc::Sender<()>>);

impl Watchdog {
    /// Arms it for `what`.
    pub fn new(secs: u64, what: &str) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let what = what.to_string();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                rx.recv_timeout(std::time::Duration::from_secs(secs))
            {
                eprintln!(
                    "WATCHDOG: {what} still running after {secs} s (a map waiting for a monitor that never answers?)"
                );
                std::process::abort();
            }
        });
        Watchdog(Some(tx))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.take();
    }
}
